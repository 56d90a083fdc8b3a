"""Multi-process runs on JAX's multi-controller runtime: initialisation, who writes, and agreeing to stop.

Every process runs the same program on its own devices; `jax.distributed.initialize` connects them. It is called
automatically where JAX recognises the cluster (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes) and
explicitly with `--coordinator_address/--num_processes/--process_id`. Several CPU processes talk through gloo.
Process 0 is the primary: the only one that writes shared files and prints progress.
"""
from __future__ import annotations

import logging
from typing import Optional

import jax
import numpy as np

log = logging.getLogger("jaxlm.distributed")


def detected_cluster() -> Optional[str]:
  """The name of the cluster environment JAX would auto-detect here, or None (plain machine)."""
  try:  # JAX's own detectors; private, so a JAX that moves them just disables auto-detection
    from jax._src import clusters
    envs = clusters.ClusterEnv._cluster_types
  except (ImportError, AttributeError):  # pragma: no cover
    return None
  for env in envs:
    try:
      if not getattr(env, "opt_in_only_method", False) and env.is_env_present():
        return env.__name__
    except Exception:  # a detector that cannot tell (e.g. no metadata server) means "not this one"
      continue
  return None


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> bool:
  """Connects this process to the others; returns whether `jax.distributed` was initialised.

  Must run before anything touches a JAX backend. Explicit arguments win; without them, initialises only on a
  detected cluster, so a plain single-machine run stays a plain single-process run.
  """
  explicit = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(explicit) and not all(explicit):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together (got "
                     f"coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
                     f"process_id={process_id!r})")
  cluster = None if all(explicit) else detected_cluster()
  if not all(explicit) and cluster is None:
    return False
  if all(explicit) and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
  # CPU devices of different processes need a collectives backend; it changes nothing for GPU/TPU devices.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if all(explicit):
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  log.info("process %d of %d (%s), %d local / %d global devices", jax.process_index(), jax.process_count(),
           cluster or coordinator_address, jax.local_device_count(), jax.device_count())
  return True


def is_primary() -> bool:
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Barrier: every process waits here until all have arrived (a no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """Whether `flag` is true on any process (a blocking all-gather; just `flag` with one process)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


class StopVote:
  """All processes agree on the step at which to stop, whichever of them received the signal.

  `vote(local_flag)` is called once per step by every process. With several processes each call dispatches a
  tiny all-reduce (any process wants to stop?) and reads the previous step's result, so the answer lags one
  step, is the same on every process, and never blocks on the step just dispatched. With one process it is the
  local flag, with no device work at all.
  """

  def __init__(self):
    self._multi = jax.process_count() > 1
    self._pending = None
    if self._multi:
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      mesh = Mesh(np.asarray(jax.devices()), ("all",))
      self._sharding = NamedSharding(mesh, P("all"))
      self._any = jax.jit(lambda flags: flags.max() > 0, out_shardings=NamedSharding(mesh, P()))

  def vote(self, local_flag: bool) -> bool:
    if not self._multi:
      return bool(local_flag)
    flags = np.full((jax.local_device_count(),), int(local_flag), np.int32)
    current = self._any(jax.make_array_from_process_local_data(self._sharding, flags))
    previous, self._pending = self._pending, current
    return previous is not None and bool(previous)
