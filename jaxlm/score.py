"""Logits, log-likelihood and perplexity of given token ids under a jaxlm model.

  python -m jaxlm.score --checkpoint DIR --tokens ids.npy [--mask mask.npy] --out logits.npy
                        [--which latest|best] [--log-probs lp.npy] [--batch-size N] [--precision P]

--checkpoint is a model directory (python -m convert torch2jax writes one) or a training workdir (its latest
checkpoint, or --which best). --tokens holds int ids [B, T] (or [T]); --mask (1 = real token, 0 = padding)
masks padded keys in attention, exactly as the model does in training. The model runs with its default
inference settings (no dropout). Writes float32 logits [B, T, V]; prints the number of scored tokens, their
mean log-likelihood (nats per token) and perplexity. Token t+1 is scored from positions <= t, and only where
both positions are real (mask 1). Matmuls run at full float32 precision by default (--precision highest): on
GPUs XLA's default may use TF32, which moves logits by ~1e-3.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def _read_ids(path: str, what: str) -> np.ndarray:
  try:
    array = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"{what} {path}: cannot read a .npy array ({e})") from None
  if array.ndim == 1:
    array = array[None, :]
  if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
    raise ValueError(f"{what} {path}: expected integer ids of shape [B, T], got {array.dtype} {array.shape}")
  return array.astype(np.int32)


def score(module, params, tokens_BxT: np.ndarray, mask_BxT: Optional[np.ndarray] = None,
          batch_size: int = 0) -> Tuple[np.ndarray, np.ndarray, Dict[str, float]]:
  """(float32 logits [B, T, V], log p(token t+1 | <= t) [B, T-1], summary stats)."""
  apply = jax.jit(lambda p, t, m: module.apply({"params": p}, t, padding_mask_BxT=m))
  b = tokens_BxT.shape[0]
  step = batch_size if batch_size > 0 else b
  chunks = []
  for start in range(0, b, step):
    t = jnp.asarray(tokens_BxT[start:start + step])
    m = None if mask_BxT is None else jnp.asarray(mask_BxT[start:start + step])
    chunks.append(np.asarray(apply(params, t, m), dtype=np.float32))
  logits = np.concatenate(chunks, axis=0)
  log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[:, :-1]), axis=-1))
  token_lp = np.take_along_axis(log_probs, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
  valid = np.ones_like(token_lp, dtype=bool)
  if mask_BxT is not None:
    valid = (mask_BxT[:, 1:] != 0) & (mask_BxT[:, :-1] != 0)
  n = int(valid.sum())
  mean = float(token_lp[valid].sum() / n) if n else float("nan")
  stats = {"tokens": n, "mean_log_likelihood": mean, "perplexity": math.exp(-mean) if n else float("nan")}
  return logits, token_lp.astype(np.float32), stats


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxlm.score", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("--checkpoint", required=True, help="model directory or training workdir")
  parser.add_argument("--which", choices=("latest", "best"), default="latest",
                      help="checkpoint of a training workdir (default latest)")
  parser.add_argument("--tokens", required=True, help=".npy int token ids [B, T]")
  parser.add_argument("--mask", help=".npy padding mask [B, T], 1 = real token")
  parser.add_argument("--out", required=True, help=".npy file for float32 logits [B, T, V]")
  parser.add_argument("--log-probs", help="optional .npy file for log p(token t+1) [B, T-1]")
  parser.add_argument("--batch-size", type=int, default=0, help="rows per forward pass (default: all)")
  parser.add_argument("--precision", choices=("default", "high", "highest"), default="highest",
                      help="float32 matmul precision (jax.default_matmul_precision); default highest")
  parser.add_argument("--mode", help="HRM reasoning mode: fast 1x1, normal 2x2, deep 3x2, thorough 4x3, extreme 6x4")
  parser.add_argument("--n-cycles", type=int, help="HRM: N cycles (overrides --mode)")
  parser.add_argument("--t-steps", type=int, help="HRM: T steps per cycle (overrides --mode)")
  args = parser.parse_args(argv)

  from jaxlm import modeldir
  from jaxlm.models import apply_reasoning
  try:
    config, module, params, _ = modeldir.load_for_inference(args.checkpoint, args.which)
    config, module = apply_reasoning(config, module, args.mode, args.n_cycles, args.t_steps)
    tokens = _read_ids(args.tokens, "--tokens")
    mask = _read_ids(args.mask, "--mask") if args.mask else None
    if mask is not None and mask.shape != tokens.shape:
      raise ValueError(f"--mask {args.mask} has shape {mask.shape}, --tokens has {tokens.shape}")
    bad = tokens[(tokens < 0) | (tokens >= config.vocab_size)]
    if bad.size:
      raise ValueError(f"--tokens {args.tokens}: id {int(bad[0])} is outside the vocabulary [0, {config.vocab_size})")
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  with jax.default_matmul_precision(args.precision):
    logits, token_lp, stats = score(module, params, tokens, mask, args.batch_size)
  for path, array in ((args.out, logits), (args.log_probs, token_lp)):
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      np.save(path, array)
  print(f"scored tokens: {stats['tokens']}")
  print(f"mean log-likelihood: {stats['mean_log_likelihood']:.6f} nats/token")
  print(f"perplexity: {stats['perplexity']:.4f}")
  print(json.dumps(stats))
  return 0


if __name__ == "__main__":
  sys.exit(main())
