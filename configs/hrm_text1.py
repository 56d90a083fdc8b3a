"""HRM-Text1: 12 stacked (H, L) block pairs with pondering halt heads (julianjjo/HRM_Models, HRMText1 of
hrm_training_small_100m.py).

  python -m jaxlm.train --config configs/hrm_text1.py:tiny --workdir runs/hrm_text1-tiny
  python -m jaxlm.train --config configs/hrm_text1.py --workdir runs/hrm_text1 --config.data.corpus=c4.jsonl
  python -m jaxlm.prepare --config configs/hrm_text1.py --config.data.corpus='c4/en/c4-train.*-of-01024.json.gz'
  python -m jaxlm.train --config configs/hrm_text1.py --config.data.corpus=tfds:c4/en:3.1.0 \
      --config.data.tfds_data_dir=gs://BUCKET/tensorflow_datasets --workdir runs/hrm_text1-c4

Variants: '' (the training script's model and optimizer: 117,129,740 parameters with the T5 vocabulary of
32,100 ids, trained the jaxlm way), 'original' (also the original's compatibility flags and weight decay on every
parameter; what `convert torch2jax` writes), 'tiny' (CPU-sized, trains on the shipped C4 sample in about two
minutes on two cores).

Kept from the original: n_embd 512, 8 heads, 12 layers, d_ff 2048, halt_max_steps 8, halt bias -2.2, ponder
weight 0.01, dropout 0.1 (residual, attention and the MLP's own), RoPE theta 1e4 (rotate-half), RMSNorm eps 1e-6,
tied head, torch default init (embedding N(0, 1), Linear variance 1/(3 fan_in)), gradient checkpointing (remat),
T5 sentencepiece vocabulary, block 2048, AdamW 2e-3 betas (0.9, 0.95) eps 1e-8 wd 0.1, 10% linear warmup then
linear decay to 0, clip 1.0, micro-batch 1 x grad accumulation 2, 3 epochs of 364,868 C4 documents
(547,302 optimizer steps), validation each epoch, patience 3.
Differs and why:
  ponder_loss='expected'   the original adds 0.01 * (number of block-pair updates), a constant with zero gradient;
                           jaxlm charges the expected number of updates under the halting distribution, which the
                           halt heads can actually learn from ('original': 'count').
  exit_over_padding=False  the global early exit (all remainders < eps) ignores padding positions; the original
                           also waits for them ('original': True).
  padding                  the original pads every document to 2048 with id 0 and trains on the pad targets;
                           jaxlm packs documents (data.packing='documents', eos-separated, no padding) and the
                           loss is weighted by batch['weights'], so padding never counts.
  weight decay             on matrices and embeddings only; the original decays every parameter, norms and the
                           halt biases (-2.2 is pulled towards 0) included ('original': all).
  data                     the real run streams C4 multilingual (0.1%); offline, the shipped C4 sample stands in
                           (pass a JSONL path with --config.data.corpus).
"""
from jaxlm.config_defaults import base_config

C4_DOCS = 364_868                  # int(364,868,892 C4 train documents * 0.1%), DATASET_SUBSET_PERCENT
STEPS_PER_EPOCH = C4_DOCS // 2     # BATCH_SIZE 1 x GRAD_ACCUM_STEPS 2 sequences per optimizer step
EPOCHS = 3


def get_config(variant: str = ""):
  c = base_config("hrm_text1")
  # bfloat16 compute on GPU/TPU (float32 parameters, softmax, norms and loss), float32 on CPU.
  c.model.dtype = "auto"
  c.model.vocab_multiple = 128  # the vocabulary axis padded inside the model (even sharding, aligned matmuls)
  c.model.update(
      family="hrm_text1", vocab_size=32100, d_model=512, n_heads=8, n_layers=12, d_ff=2048,
      max_seq_len=2048, rope_theta=1e4, norm_eps=1e-6, halt_max_steps=8, halt_bias_init=-2.2, halt_eps=1e-6,
      ponder_loss_weight=0.01, ponder_loss="expected", exit_over_padding=False, dropout=0.1,
      attention_dropout=0.1, mlp_dropout=0.1, embed_init_std=1.0, init_std=0.0, remat=True)
  # C4 texts of <= 100 characters are dropped, as the original's filter does; it appends EOS to each text. Its optional
  # language filter: --config.data.language=en (needs langdetect: pip install "jaxlm[lang]").
  c.data.update(corpus="c4_sample", tokenizer="sentencepiece", vocab_size=32100, packing="documents",
                val_fraction=0.1, min_chars=101)
  steps = STEPS_PER_EPOCH * EPOCHS
  c.opt.update(name="adamw", lr=2e-3, schedule="linear", warmup_steps=int(0.1 * steps), min_lr_ratio=0.0,
               b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, weight_decay_on="matrices", clip_norm=1.0,
               grad_accum=2)
  c.train.update(steps=steps, batch_size=2, seq_len=2048, eval_every=STEPS_PER_EPOCH, save_every=1000,
                 patience=3, sample_tokens=100, sample_prompt="The", sample_temperature=0.7)

  if variant == "original":
    c.model.update(ponder_loss="count", exit_over_padding=True)
    c.opt.weight_decay_on = "all"
  elif variant == "tiny":
    # Two block pairs of width 128, three halt reads per layer (two updates), context 64: 5.16M parameters,
    # 4.1M of them the 32,100 x 128 tied table (its logits cost most of a step). Dropout off (200 steps do not
    # overfit). The table starts at N(0, 0.02^2), not the original's N(0, 1): tied to the head, a unit-variance
    # table puts the first logits at std ~sqrt(128) (train loss ~88 nats at step 25, validation still 12 at
    # step 150, against 7.4 with 0.02).
    c.model.update(dtype="float32", vocab_multiple=1, d_model=128, n_heads=4, n_layers=2, d_ff=512, max_seq_len=64,
                   halt_max_steps=3, dropout=0.0, attention_dropout=0.0, mlp_dropout=0.0, embed_init_std=0.02, remat=False)
    c.data.update(eval_batches=8)  # 4,096 of the 17,173 validation tokens
    c.opt.update(warmup_steps=20, grad_accum=2)
    c.train.update(steps=200, batch_size=8, seq_len=64, eval_every=50, save_every=100, log_every=25,
                   patience=0, sample_tokens=24, sample_temperature=0.0)
  elif variant:
    raise ValueError(f"unknown hrm_text1 variant {variant!r}; choose '', 'original' or 'tiny'")
  return c
