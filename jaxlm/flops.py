"""Model FLOPs per trained token and device peaks, for `tflops_per_device` and `mfu` (counted as MaxText does).

Training FLOPs = 3 x forward FLOPs (backward = 2 x forward) of the model's matrix multiplications: 2 x the
weights applied per token (every projection, the MLP and the output head; the input embedding is a lookup and
norms/biases are negligible) plus attention's two products, 4 x heads x head_dim x (keys each query sees, on
average: (T+1)/2 causal, fewer inside a sliding window). Rematerialisation is not counted: MFU measures the
model's work, not the recomputation. Recurrent models count their block applications at the configured step
counts: HRM one segment (train_mode 'single') or every segment up to halt_max_steps ('act', an upper bound when
rows halt early), its 1-step gradient differentiating only the last L and H update; HRM-Text1 runs every pondering
step (a finished layer's steps still compute, masked).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

# Dense bf16 peak TFLOP/s per device (chip or GPU), by substrings of jax.Device.device_kind.
PEAK_BF16_TFLOPS = (
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v5p", 459.0), ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0), ("TPU v6e", 918.0), ("TPU7x", 2307.0),
    ("A100", 312.0),
    ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("B200", 2250.0),
)


def peak_tflops(device_kind: str) -> Optional[float]:
  """The device's bf16 dense peak, or None when unknown (CPUs: no MFU is reported)."""
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return None


def mean_keys_per_query(length: int, causal: bool, window: int) -> float:
  """Average number of keys a query attends to in a [length] self-attention with jaxlm's mask."""
  q = np.arange(length)
  lo = np.maximum(0, q - window + 1) if window else np.zeros_like(q)
  hi = q if causal else np.full_like(q, length - 1)
  return float(np.mean(hi - lo + 1))


def _block_flops(d: int, n_heads: int, kv_heads: int, head_dim: int, d_ff: int, keys: float) -> float:
  """Forward FLOPs per token of one pre/post-norm block: projections, gated MLP (value, gate, out), attention."""
  weights = d * (n_heads + 2 * kv_heads) * head_dim + n_heads * head_dim * d + 3 * d * d_ff
  return 2.0 * weights + 4.0 * n_heads * head_dim * keys


def training_flops_per_token(config, seq_len: int) -> float:
  """Model FLOPs of one training token for a typed model config (decoder, hrm, hrm_text1)."""
  kind = type(config).__name__
  if kind == "DecoderConfig":
    forward = 2.0 * config.d_model * config.vocab_size
    for window in config.layer_windows:
      keys = mean_keys_per_query(seq_len, config.causal, int(window or 0))
      forward += _block_flops(config.d_model, config.n_heads, config.kv_heads, config.resolved_head_dim,
                              config.d_ff, keys)
    return 3.0 * forward
  if kind == "HRMConfig":
    keys = mean_keys_per_query(seq_len, config.causal, 0)
    block = _block_flops(config.d_model, config.n_heads, config.n_heads, config.head_dim, config.d_ff, keys)
    l_step, h_step = config.l_layers * block, config.h_layers * block
    head = 2.0 * config.d_model * (config.vocab_size + 2)
    segment = config.n_cycles * config.t_steps * l_step + config.n_cycles * h_step + head
    segments = 1 if config.train_mode == "single" else config.halt_max_steps
    differentiated = segment if config.grad_mode == "full" else l_step + h_step + head
    return segments * (segment + 2.0 * differentiated)
  if kind == "HRMText1Config":
    keys = mean_keys_per_query(seq_len, True, 0)
    block = _block_flops(config.d_model, config.n_heads, config.n_heads, config.resolved_head_dim, config.d_ff,
                         keys)
    forward = config.n_layers * (config.halt_max_steps - 1) * 2 * block + 2.0 * config.d_model * config.vocab_size
    return 3.0 * forward
  raise ValueError(f"no FLOP count for {kind}")
