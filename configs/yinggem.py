"""YingGem-T1: sliding-window decoder (naidezhujimo/YingGem-T1).

  python -m jaxlm.train --config configs/yinggem.py:tiny --workdir runs/yinggem-tiny
  python -m jaxlm.train --config configs/yinggem.py --workdir runs/yinggem        # full size, GPT-2 BPE

Variants: '' (the original's size, 133,957,969 parameters, trained the correct way), 'original' (also the
original's compatibility flags, what `convert torch2jax` writes), 'tiny' (nanoGPT's CPU Shakespeare recipe),
'speedrun' (tiny's data, two of its blocks, trained with Muon to validation loss 1.88 as fast as a CPU allows).

Flags that differ from the original and why:
  causal=True           the original mask lets every query see all later keys inside the window (the LM
                        objective leaks the target); 'original' sets causal=False to reproduce its logits.
  opt.grad zeroing      the original never zeroes gradients (they accumulate over all steps); jaxlm does.
  loss ignore           the original ignores target id 0 (GPT-2 '!'); jaxlm weights every real target.
Kept from the original: rotate-half RoPE (theta 1e4), RMSNorm eps 1e-6, "GeGLU" that is a*sigmoid(g),
biases on every Linear, untied head with bias, window 1024, Adafactor with relative step, patience 3.
"""
from jaxlm.config_defaults import base_config


def _shakespeare() -> str:
  """TFDS's tiny_shakespeare when it is prepared in ~/tensorflow_datasets (its train split), else the shipped file
  (the same text, all of it)."""
  from jaxlm.data import catalog
  try:
    catalog.dataset_dir("tfds:tiny_shakespeare", "")
    return "tfds:tiny_shakespeare"
  except FileNotFoundError:
    return "tinyshakespeare"


def get_config(variant: str = ""):
  c = base_config()
  # bfloat16 compute on GPU/TPU (float32 parameters, softmax, norms and loss), float32 on CPU.
  c.model.dtype = "auto"
  c.model.vocab_multiple = 128  # vocabulary axes padded inside the model (even sharding, aligned matmuls)
  # One scanned, rematerialised block stack: what keeps the full-size config within 8 GiB on a CPU (bench/memory.py).
  c.model.update(scan_layers=True, remat_policy="full")
  c.model.update(
      family="yinggem", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=1024,
      norm="rms", norm_eps=1e-6, rope_style="half", rope_theta=1e4, glu="sigmoid",
      attn_bias=True, mlp_bias=True, head_bias=True, tie_embeddings=False,
      causal=True, attention_window=1024, attention_dropout=0.2,
      embed_init_std=0.02, init_std=0.02 / (2 * 12) ** 0.5, max_seq_len=1024)
  c.data.update(corpus=_shakespeare(), tokenizer="gpt2", val_fraction=0.2)
  c.opt.update(name="adafactor", schedule="rsqrt_relative", lr=1.0, warmup_steps=0, weight_decay=0.0,
               clip_norm=1.0)
  c.train.update(steps=20000, batch_size=8, seq_len=1024, eval_every=500, save_every=500, patience=3)

  if variant == "original":
    c.model.causal = False
  elif variant == "tiny":
    # nanoGPT's CPU Shakespeare-char recipe: 4 layers, 4 heads, width 128, context 64, batch 12, 2000 steps,
    # AdamW 1e-3 (beta2 0.99, wd 0.1), 100 warmup steps, cosine to 1e-4, no dropout. The MLP width keeps
    # nanoGPT's 8*D^2 MLP parameters with a gated MLP (3*D*F). Window 64 = context: full causal attention.
    # The CPU recipe: exact float32, no padding, no rematerialisation; the blocks' parameters stacked (scan_layers)
    # with the scan unrolled: no loop in the program, and 57 arrays in the train state instead of 183, which the
    # optimizer and each jitted call handle one by one (0.95x the step with data on 2 cores, bench/README.md).
    c.model.update(dtype="float32", vocab_multiple=1, scan_layers=True, scan_unroll=4, remat_policy="none")
    c.model.update(vocab_size=0, d_model=128, n_layers=4, n_heads=4, d_ff=344, attention_window=64,
                   attention_dropout=0.0, init_std=0.02, out_init_std=0.02 / (2 * 4) ** 0.5, max_seq_len=64)
    c.data.update(tokenizer="char", val_fraction=0.1)
    c.opt.update(name="adamw", schedule="cosine", lr=1e-3, warmup_steps=100, min_lr_ratio=0.1,
                 b1=0.9, b2=0.99, weight_decay=0.1)
    c.train.update(steps=2000, batch_size=12, seq_len=64, eval_every=250, save_every=500, patience=0,
                   eval_batch_size=96, batches_per_put=16)
    c.mesh.cpu_devices = -1  # one XLA device per core: a ~30 ms step on 2 cores against ~36 ms on one device
  elif variant == "speedrun":
    # tiny's data, tokenizer and validation split, trained to tiny Shakespeare's 1.88 as fast as a CPU allows
    # (bench/train_tiny.py; each choice measured there): two of tiny's blocks (32k tokens/s on 2 cores against
    # 16k with four, and 1.88 in about as many steps); Muon on the block matrices and AdamW on embeddings, head,
    # norms and biases, as the modded-nanogpt speedrun does, at batch 48 (the orthogonalisation costs the same
    # for any batch); lr 0.05 / 0.015 cosine to 0 over 250 steps. Evaluations every 10 steps on 96 random
    # validation windows, on the whole split once they reach the target; the run stops there (~170 steps).
    c = get_config("tiny")
    c.model.update(n_layers=2, out_init_std=0.02 / (2 * 2) ** 0.5)
    c.opt.update(name="muon", lr=0.05, adam_lr=0.015, warmup_steps=20, min_lr_ratio=0.0, weight_decay=0.0)
    c.train.update(steps=250, batch_size=48, eval_every=10, eval_windows=96, target_eval_loss=1.88,
                   save_every=250, log_every=25)
  elif variant:
    raise ValueError(f"unknown yinggem variant {variant!r}; choose '', 'original', 'tiny' or 'speedrun'")
  return c
