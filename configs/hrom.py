"""HROM-V1: dialogue transformer (TimurHromek/HROM-V1).

  python -m jaxlm.train --config configs/hrom.py:tiny --workdir runs/hrom-tiny
  python -m jaxlm.train --config configs/hrom.py --workdir runs/hrom              # full size

Variants: '' (the original's size, 58,019,072 parameters), 'original' (same), 'tiny' (CPU-sized on the shipped
DailyDialog sample, char-level).

Kept from the original: pre-LayerNorm (eps 1e-5, with bias), fused-qkv attention with biases, rotate-half RoPE
(theta 1e4), "SwiGLU" that is a*sigmoid(g), untied head with bias, dropout 0.1 (residual and attention),
embedding init N(0, 1), AdamW 3e-4 with weight decay 0.01 on every parameter and constant LR, <s>/<user>/
<assistant>/</s> dialogue format with at most 6 turns.
Differs and why: the original clips fp16-scaled gradients (its clip is a no-op bug); jaxlm clips the true
gradient norm. The tokenizer is the original's: a Hugging Face `tokenizers` ByteLevel BPE trained on the corpus's
turns with the original's settings (on the shipped DailyDialog sample, the same file byte for byte); like the
original's encode, it ends every document with `</s>`. `--config.data.tokenizer_path=PATH` uses an existing
hrom_tokenizer.json instead.
"""
from jaxlm.config_defaults import base_config


def get_config(variant: str = ""):
  c = base_config()
  # bfloat16 compute on GPU/TPU (float32 parameters, softmax, norms and loss), float32 on CPU.
  c.model.dtype = "auto"
  c.model.vocab_multiple = 128  # vocabulary axes padded inside the model (even sharding, aligned matmuls)
  # One scanned, rematerialised block stack: what keeps the full-size config within 8 GiB on a CPU (bench/memory.py).
  c.model.update(scan_layers=True, remat_policy="full")
  c.model.update(
      family="hrom", vocab_size=32000, d_model=512, n_layers=6, n_heads=8, d_ff=2048,
      norm="layer", norm_eps=1e-5, rope_style="half", rope_theta=1e4, glu="sigmoid",
      attn_bias=True, mlp_bias=True, head_bias=True, tie_embeddings=False, causal=True,
      dropout=0.1, attention_dropout=0.1, embed_init_std=1.0, init_std=0.02, max_seq_len=1024)
  c.data.update(corpus="dailydialog_sample", format="dialogue", tokenizer="hrom_bpe", tokenizer_path="",
                vocab_size=32000, packing="padded", val_fraction=0.1)  # one dialogue (<= 6 turns) a row, as HROM
  # All of DailyDialog: --config.data.corpus=ijcnlp_dailydialog/dialogues_text.txt; loss on the assistant turns
  # only (the original trains every token): --config.data.loss_on=response
  c.opt.update(name="adamw", lr=3e-4, schedule="constant", warmup_steps=0, b1=0.9, b2=0.999,
               weight_decay=0.01, weight_decay_on="all", clip_norm=1.0)
  c.train.update(steps=17400, batch_size=32, seq_len=1024, eval_every=1000, save_every=1000,
                 sample_prompt="<s><user> Hello!</s><assistant>")

  if variant == "original":
    pass
  elif variant == "tiny":
    # The CPU recipe: exact float32, no padding, blocks unrolled and not rematerialised (fastest at this size).
    c.model.update(dtype="float32", vocab_multiple=1, scan_layers=False, remat_policy="none")
    c.model.update(vocab_size=0, d_model=128, n_layers=2, n_heads=4, d_ff=256, max_seq_len=128,
                   dropout=0.0, attention_dropout=0.0)
    c.data.update(tokenizer="char", vocab_size=0)
    c.opt.update(lr=1e-3)
    c.train.update(steps=200, batch_size=8, seq_len=128, eval_every=50, save_every=100, sample_tokens=100,
                   sample_prompt="<user> ")
  elif variant:
    raise ValueError(f"unknown hrom variant {variant!r}; choose '', 'original' or 'tiny'")
  return c
