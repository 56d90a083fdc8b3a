"""Orbax checkpoints of a training run: train state + run metadata (data position included).

Layout of a workdir (a local path or a `gs://` URL):
  checkpoints/<step>/{state,meta}   the last `train.keep_checkpoints` steps
  best/<step>/{state,meta}          the step with the lowest eval loss so far (params only)
  tokenizer/tokenizer.json          the run's tokenizer (built once, reused on resume)
Saves are asynchronous: `save` returns once the arrays are copied off the devices and training goes on while
they are written. Orbax writes each step into a temporary directory and renames (locally) or marks it
committed (Cloud Storage) when every process has finished, so a crash or kill during a save leaves the previous
checkpoint as the latest. Every process calls save/restore; each writes the shards it holds, the primary writes
the metadata. The data position is a count of global batches in `meta`, so a checkpoint restores onto any
number of processes and devices.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxlm import fs

# Orbax splits the writing of a replicated array among its replicas, compiling a slicing program per array shape
# (about 70 compilations at the first save of a small model on 8 devices). Splitting pays only for large arrays.
_MIN_REPLICA_SLICE_BYTES = 4 << 20
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES),
    override=True)


def _manager(directory: str, keep: int, read_only: bool = False, name: str = "ckpt") -> ocp.CheckpointManager:
  directory = fs.absolute(directory)
  if read_only:  # Orbax logs a warning for each option a read-only manager ignores; there is nothing to act on
    options = ocp.CheckpointManagerOptions(create=False, read_only=True, save_interval_steps=0,
                                           enable_async_checkpointing=False)
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
      return ocp.CheckpointManager(directory, options=options)
    finally:
      absl_log.setLevel(level)
  # Two managers save in one run: distinct barrier names keep their cross-process syncs apart.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=True,
      multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))
  return ocp.CheckpointManager(directory, options=options)


class RunCheckpointer:
  """Saves/restores a run's state; keeps the last K steps and, separately, the best by eval loss."""

  def __init__(self, workdir: str, keep: int = 3):
    self.workdir = workdir
    self.latest = _manager(fs.join(workdir, "checkpoints"), keep, name="latest")
    self.best = _manager(fs.join(workdir, "best"), 1, name="best")

  def latest_step(self) -> Optional[int]:
    return self.latest.latest_step()

  def save(self, step: int, state: Any, meta: Dict[str, Any]) -> None:
    """Starts writing `step` and returns; a save still in flight is finished first."""
    self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                     force=True)

  def save_best(self, step: int, params: Any, meta: Dict[str, Any]) -> None:
    if step in self.best.all_steps():
      return
    self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params}),
                                                 meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: Any) -> Tuple[Any, Dict[str, Any]]:
    """The state laid out as `abstract_state` says (shapes, dtypes, shardings of this run's mesh, whatever
    mesh wrote it) and the metadata."""
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    restored = self.latest.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["meta"]

  def read_meta(self, step: int) -> Dict[str, Any]:
    return self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    """Blocks until every save in flight is written."""
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.latest.close()
    self.best.close()


def restore_for_inference(workdir: str, which: str = "latest") -> Tuple[Dict[str, Any], Any, str]:
  """(model config dict, params as numpy arrays, local tokenizer dir) from a training workdir."""
  if which not in ("latest", "best"):
    raise ValueError(f"--which must be 'latest' or 'best', got {which!r}")
  manager = _manager(fs.join(workdir, "checkpoints" if which == "latest" else "best"), 1, read_only=True)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no {which} checkpoint in {workdir!r}")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                           meta=ocp.args.JsonRestore()))
  manager.close()
  params = jax.tree.map(np.asarray, restored["state"]["params"])
  return restored["meta"]["model"], params, fs.local_dir(fs.join(workdir, "tokenizer"))
