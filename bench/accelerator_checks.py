"""The attention kernels that only an accelerator runs, checked against the reference on that accelerator.

  python bench/accelerator_checks.py          # on a GPU: cudnn; on a TPU: splash (compiled, not interpreted)

The CPU suite checks the cuDNN path's flag translation (through XLA) and the splash kernel in Pallas' interpreter;
this script runs the real kernels: forward and gradients of causal, sliding-window and (splash) padded and
segmented masks with GQA, bf16 inputs, against attention.explicit_attention on the same inputs in float32.
Tolerance: bf16 rounding of inputs and outputs, 2e-2 of the largest reference entry. Prints one JSON row per case
and exits 1 if any case is off. Part of bench/on_accelerator.sh.
"""
from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.models import attention

TOLERANCE = 2e-2


def _case(impl: str, name: str, spec, b: int, t: int, n: int, k: int, h: int) -> dict:
  rq, rk, rv, rc = jax.random.split(jax.random.key(0), 4)
  q, kk, v = (jax.random.normal(r, (b, t, heads, h), jnp.float32) for r, heads in ((rq, n), (rk, k), (rv, k)))
  rows = np.asarray(spec.dense()[:, 0].any(-1))
  cotangent = jax.random.normal(rc, (b, t, n, h)) * rows[:, :, None, None]
  want, want_vjp = jax.vjp(lambda *x: attention.explicit_attention(*x, spec.dense()), q, kk, v)
  bf16 = lambda x: x.astype(jnp.bfloat16)
  run = jax.jit(lambda *x: attention.attend(*map(bf16, x), spec, impl=impl, block_q=512).astype(jnp.float32))
  got, got_vjp = jax.vjp(run, q, kk, v)
  errors = {"out": float(np.abs(np.asarray(got) - np.asarray(want))[rows].max() / np.abs(want).max())}
  for label, g, w in zip(("dq", "dk", "dv"), got_vjp(cotangent), want_vjp(cotangent)):
    errors[label] = float(np.abs(np.asarray(g) - np.asarray(w)).max() / max(float(np.abs(w).max()), 1e-30))
  return {"impl": impl, "case": name, **errors, "ok": max(errors.values()) <= TOLERANCE}


def main() -> int:
  backend = jax.default_backend()
  b, t, n, k, h = 2, 1024, 8, 2, 64
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  plain = lambda **kw: attention.MaskSpec(positions, positions, arange_positions=True, **kw)
  cases = [("causal", plain(causal=True)), ("causal_window_256", plain(causal=True, window=256))]
  if backend == "gpu":
    impl = "cudnn"
  elif backend == "tpu":
    impl = "splash"
    k_valid = jnp.arange(t)[None, :] >= jnp.array([[0], [100]])
    segments = (jnp.arange(t)[None, :] >= jnp.array([[300], [700]])).astype(jnp.int32)
    cases += [("yinggem_noncausal_window_256", plain(causal=False, window=256)),
              ("left_padding", plain(causal=True, k_valid_BxS=k_valid)),
              ("segments", plain(causal=True, q_segment_BxT=segments, k_segment_BxS=segments))]
  else:
    print(json.dumps({"backend": backend, "note": "no accelerator kernel to check on this backend"}))
    return 0
  rows = [_case(impl, name, spec, b, t, n, k, h) for name, spec in cases]
  for row in rows:
    print(json.dumps({"backend": backend, "device": jax.devices()[0].device_kind, **row}))
  return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
