"""Logits, log-likelihood and perplexity of given token ids under a jaxlm model.

  python -m jaxlm.score --checkpoint DIR --tokens ids.npy [--mask mask.npy] --out logits.npy
                        [--which latest|best] [--log-probs lp.npy] [--batch-size N] [--precision P] [--verbose]

--checkpoint is a model directory (python -m convert torch2jax writes one) or a training workdir (its latest
checkpoint, or --which best). --tokens holds int ids [B, T] (or [T]); --mask (1 = real token, 0 = padding)
masks padded keys in attention, exactly as the model does in training. The model runs with its default
inference settings (no dropout). Writes float32 logits [B, T, V]; prints the number of scored tokens, their
mean log-likelihood (nats per token) and perplexity. Token t+1 is scored from positions <= t, and only where
both positions are real (mask 1). Matmuls run at full float32 precision by default (--precision highest): on
GPUs XLA's default may use TF32, which moves logits by ~1e-3.

Outputs are written to hidden temporary files beside them and renamed into place once all are complete, so a
failure (disk full, Ctrl-C) leaves no partial --out file and an earlier one untouched. Errors are one line on
stderr naming the path (the traceback with --verbose or JAXLM_VERBOSE=1); exit codes as in jaxlm.errors:
0 done, 1 a failure while running (file system), 2 bad input, 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import secrets
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import errors, validate

ARGS = {"batch_size": validate.integer(0, note="0 = all rows at once"),
        "n_cycles": validate.integer(1), "t_steps": validate.integer(1)}


def _read_ids(path: str, what: str) -> np.ndarray:
  """int32 ids [B, T] from a .npy file; a file-system failure stays an OSError naming the path."""
  try:
    array = np.load(path, allow_pickle=False)
  except (ValueError, EOFError) as e:
    raise ValueError(f"{what} {path}: cannot read a .npy array ({e or 'empty file'})") from None
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


# ------------------------------------------------------------------------------------------ output files
def _stage(path: str, array: np.ndarray) -> str:
  """Writes `array` (.npy) to a hidden temporary file beside `path` and returns its name; an OSError names
  `path` (not the temporary file) and leaves nothing behind."""
  target = os.path.abspath(path)
  parent = os.path.dirname(target)
  try:
    try:
      os.makedirs(parent, exist_ok=True)
    except FileExistsError:  # the parent is a file
      raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), parent) from None
    tmp = os.path.join(parent, f".{os.path.basename(target)}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the mode np.save would give (umask)
    try:
      with os.fdopen(fd, "wb") as f:
        np.save(f, array)
    except BaseException:
      os.unlink(tmp)
      raise
  except OSError as e:
    raise _naming(path, e) from e
  return tmp


def _naming(path: str, e: OSError) -> OSError:
  """The same failure, reported against `path` (what the user asked for)."""
  return OSError(e.errno, e.strerror, path) if e.errno is not None else OSError(f"{path}: {e}")


def save_outputs(outputs: Sequence[Tuple[str, np.ndarray]]) -> None:
  """Writes every (path, array) or none: all are staged first, then renamed into place."""
  staged: List[Tuple[str, str]] = []
  try:
    for path, array in outputs:
      staged.append((_stage(path, array), path))
    for tmp, path in staged:
      try:
        os.replace(tmp, path)
      except OSError as e:
        raise _naming(path, e) from e
  finally:
    for tmp, _ in staged:
      if os.path.lexists(tmp):
        os.unlink(tmp)


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
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
  parser.add_argument("--verbose", action="store_true", help="print the traceback of an error (or JAXLM_VERBOSE=1)")
  return parser


def main(argv=None) -> int:
  """Exit codes (jaxlm.errors): 0 done, 1 a failure while running, 2 bad input, 130 Ctrl-C."""
  argv = sys.argv[1:] if argv is None else list(argv)
  return errors.run_command(lambda: _run(build_parser().parse_args(argv)), argv)


def _run(args) -> int:
  from jaxlm import modeldir
  from jaxlm.models import apply_reasoning
  validate.check_args(args, ARGS)
  tokens = _read_ids(args.tokens, "--tokens")
  mask = _read_ids(args.mask, "--mask") if args.mask else None
  if mask is not None and mask.shape != tokens.shape:
    raise ValueError(f"--mask {args.mask} has shape {mask.shape}, --tokens has {tokens.shape}")
  config, module, params, _ = modeldir.load_for_inference(args.checkpoint, args.which)
  config, module = apply_reasoning(config, module, args.mode, args.n_cycles, args.t_steps)
  bad = tokens[(tokens < 0) | (tokens >= config.vocab_size)]
  if bad.size:
    raise ValueError(f"--tokens {args.tokens}: id {int(bad[0])} is outside the vocabulary [0, {config.vocab_size})")
  with jax.default_matmul_precision(args.precision):
    logits, token_lp, stats = score(module, params, tokens, mask, args.batch_size)
  save_outputs([(args.out, logits)] + ([(args.log_probs, token_lp)] if args.log_probs else []))
  print(f"scored tokens: {stats['tokens']}")
  print(f"mean log-likelihood: {stats['mean_log_likelihood']:.6f} nats/token")
  print(f"perplexity: {stats['perplexity']:.4f}")
  print(json.dumps(stats))
  return 0


if __name__ == "__main__":
  sys.exit(main())
