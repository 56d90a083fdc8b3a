"""One XLA CPU device per core for single-process CPU runs (`mesh.cpu_devices`).

XLA:CPU runs one program per device, each with its own threads. For the tiny configs a data-parallel mesh of one
device per core is faster than one device using every core (yinggem:tiny's step on 2 cores: ~30 ms against ~36,
with the devices' gradients added by pairwise_sum; 34-38 ms with XLA's all-reduce; bench/README.md), so they ask
for it with mesh.cpu_devices=-1. It must be chosen before JAX starts its CPU backend; it changes nothing where the
devices are GPUs or TPUs.
"""
from __future__ import annotations

import os
from typing import Optional


def cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def set_elsewhere() -> bool:
  """Whether the CPU device count is already chosen (XLA_FLAGS, JAX_NUM_CPU_DEVICES)."""
  return ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
          or bool(os.environ.get("JAX_NUM_CPU_DEVICES")))


def choose(config, n_cores: int) -> int:
  """mesh.cpu_devices as a count: -1 = the largest count up to `n_cores` that divides the training batch (and
  its microbatches) and the evaluation batch; N = N; 1 = one device using every core."""
  want = int(config.mesh.get("cpu_devices", 1) or 1)
  if want > 0:
    return want
  tc = config.train
  micro = tc.batch_size // max(int(config.opt.get("grad_accum", 1) or 1), 1)
  eval_batch = int(tc.get("eval_batch_size", 0) or 0) or tc.batch_size
  return next(d for d in range(max(n_cores, 1), 0, -1)
              if tc.batch_size % d == 0 and micro % d == 0 and eval_batch % d == 0)


def configure(config) -> Optional[int]:
  """Sets JAX's CPU device count from `config` (before the backend starts); returns it, or None when the
  environment already chose one."""
  if set_elsewhere():
    return None
  count = choose(config, cores())
  if count > 1:
    import jax
    jax.config.update("jax_num_cpu_devices", count)
  return count
