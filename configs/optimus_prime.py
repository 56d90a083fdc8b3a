"""Optimus Prime: Llama-like decoder with grouped-query attention (nik3348/optimus-prime).

  python -m jaxlm.train --config configs/optimus_prime.py:tiny --workdir runs/optimus-tiny
  python -m jaxlm.train --config configs/optimus_prime.py --workdir runs/optimus   # full size

Variants: '' (the original's size, 224,652,288 parameters), 'original' (same flags; the original's training
mask bug is not reproduced, see below), 'tiny' (CPU-sized, char-level on the shipped Dolly-format sample).

Kept from the original: GQA 8 query / 2 kv heads (query head h uses kv head h // 4), interleaved RoPE
(torchtune), RMSNorm eps = float32 machine epsilon, SwiGLU w3(w1(x) * silu(w2(x))) with biases, MLP 4*D,
untied head without bias, gradient checkpointing (model.remat), AdamW 1e-4 wd 0.01 on every parameter,
10% warmup then cosine to 0, clip 1.0.
Differs and why: the original trains with an anti-causal mask (triu(diagonal=1) read as True = attend, so each
position sees its own target) and trains on padding; jaxlm trains causally with padding masked out.
"""
from jaxlm.config_defaults import base_config

EPS_F32 = 1.1920928955078125e-07


def get_config(variant: str = ""):
  c = base_config()
  # bfloat16 compute on GPU/TPU (float32 parameters, softmax, norms and loss), float32 on CPU.
  c.model.dtype = "auto"
  c.model.vocab_multiple = 128  # vocabulary axes padded inside the model (even sharding, aligned matmuls)
  # One scanned, rematerialised block stack: what keeps the full-size config within 8 GiB on a CPU (bench/memory.py).
  c.model.update(scan_layers=True, remat_policy="full")
  c.model.update(
      family="optimus_prime", vocab_size=50257, d_model=1024, n_layers=8, n_heads=8, n_kv_heads=2, d_ff=4096,
      norm="rms", norm_eps=EPS_F32, rope_style="interleaved", rope_theta=1e4, glu="silu",
      attn_bias=False, mlp_bias=True, head_bias=False, tie_embeddings=False, causal=True,
      embed_init_std=0.02, init_std=0.02, max_seq_len=512, remat=True)
  # Dolly-15k is not shipped (no downloads here): pass its JSONL path with --config.data.corpus=PATH.
  c.data.update(corpus="databricks-dolly-15k.jsonl", format="dolly", tokenizer="gpt2", packing="documents",
                val_fraction=0.1)
  c.opt.update(name="adamw", lr=1e-4, schedule="cosine", warmup_steps=56, min_lr_ratio=0.0, b1=0.9, b2=0.999,
               weight_decay=0.01, weight_decay_on="all", clip_norm=1.0)
  c.train.update(steps=565, batch_size=8, seq_len=512, eval_every=113, save_every=113)

  if variant == "original":
    pass
  elif variant == "tiny":
    # The CPU recipe: exact float32, no padding, blocks unrolled and not rematerialised (fastest at this size).
    c.model.update(dtype="float32", vocab_multiple=1, scan_layers=False, remat_policy="none")
    c.model.update(vocab_size=0, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=512,
                   max_seq_len=128, remat=False)
    c.data.update(corpus="dolly_sample", tokenizer="char")  # the hand-written Dolly-schema sample shipped here
    c.opt.update(lr=1e-3, warmup_steps=20)
    c.train.update(steps=200, batch_size=8, seq_len=128, eval_every=50, save_every=100, sample_tokens=100,
                   sample_prompt="Instruction: ")
  elif variant:
    raise ValueError(f"unknown optimus_prime variant {variant!r}; choose '', 'original' or 'tiny'")
  return c
