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
import time
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from etils import epath

from jaxlm import checksum, distributed, errors, fs

# Orbax splits the writing of a replicated array among its replicas, compiling a slicing program per array shape
# (about 70 compilations at the first save of a small model on 8 devices). Splitting pays only for large arrays.
_MIN_REPLICA_SLICE_BYTES = 4 << 20


def _register_array_handler() -> None:
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)  # Orbax warns that it overrides its default; that is the point
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES),
        override=True)
  finally:
    absl_log.setLevel(level)


_register_array_handler()


def _quietly(read):
  """`read()` without absl's warnings (Orbax warns about every option a read-only manager ignores, and that an
  item directory has no step metadata file of its own: nothing to act on)."""
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    return read()
  finally:
    absl_log.setLevel(level)


def _manager(directory: str, keep: int, read_only: bool = False, name: str = "ckpt") -> ocp.CheckpointManager:
  directory = fs.absolute(directory)
  if read_only:
    options = ocp.CheckpointManagerOptions(create=False, read_only=True, save_interval_steps=0,
                                           enable_async_checkpointing=False)
    return _quietly(lambda: ocp.CheckpointManager(directory, options=options))
  # Two managers save in one run: distinct barrier names keep their cross-process syncs apart.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=True,
      multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))
  return ocp.CheckpointManager(directory, options=options)


class CheckpointUnusable(ValueError):
  """A checkpoint that cannot be read or fails its checksums; the message names its directory and why."""


class NonFiniteState(FloatingPointError):
  """A train state with NaN or Inf values, which is never written."""


class RunCheckpointer:
  """Saves/restores a run's state; keeps the last K steps and, separately, the best by eval loss.

  Every save records a checksum of each array (jaxlm.checksum) in the metadata and refuses a state with
  non-finite values; every restore recomputes the checksums and raises CheckpointUnusable on a mismatch.
  """

  def __init__(self, workdir: str, keep: int = 3):
    self.workdir = workdir
    self.latest = _manager(fs.join(workdir, "checkpoints"), keep, name="latest")
    self.best = _manager(fs.join(workdir, "best"), 1, name="best")

  def latest_step(self) -> Optional[int]:
    return self.latest.latest_step()

  def steps_newest_first(self) -> list:
    return sorted(self.latest.all_steps(), reverse=True)

  def step_dir(self, step: int) -> str:
    return fs.join(self.workdir, "checkpoints", str(step))

  def save(self, step: int, state: Any, meta: Dict[str, Any]) -> None:
    """Starts writing `step` and returns; a save still in flight is finished first."""
    sums, finite = checksum.device_checksums(state)
    if not finite:
      raise NonFiniteState(f"refusing to save step {step}: the train state holds NaN or Inf values")
    self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave({**meta, "checksums": sums})),
                     force=True)

  def save_best(self, step: int, state: Any, meta: Dict[str, Any]) -> None:
    """Saves `state.params` as the best so far. Checksummed through the whole state: the same compiled program
    as `save`, the parameters' entries kept."""
    if step in self.best.all_steps():
      return
    sums, finite = checksum.device_checksums(state)
    if not finite:
      raise NonFiniteState(f"refusing to save the best parameters of step {step}: they hold NaN or Inf values")
    sums = {k: v for k, v in sums.items() if k.startswith("params/")}
    self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": state.params}),
                                                 meta=ocp.args.JsonSave({**meta, "checksums": sums})), force=True)

  def read_meta(self, step: int) -> Dict[str, Any]:
    try:
      meta = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001: whatever Orbax raises for damaged files
      raise CheckpointUnusable(f"{self.step_dir(step)}: its metadata cannot be read ({errors.root_cause(e)})") from e
    if not isinstance(meta, dict) or "model" not in meta:
      raise CheckpointUnusable(f"{self.step_dir(step)}: its metadata is not a jaxlm checkpoint's")
    return meta

  def restore(self, step: int, abstract_state: Any) -> Tuple[Any, Dict[str, Any]]:
    """The state laid out as `abstract_state` says (shapes, dtypes, shardings of this run's mesh, whatever
    mesh wrote it) and the metadata, checked against the recorded checksums."""
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    try:
      restored = self.latest.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001
      raise CheckpointUnusable(f"{self.step_dir(step)}: cannot be restored ({errors.root_cause(e)})") from e
    recorded = restored["meta"].get("checksums")
    if recorded is not None:
      _verify(self.step_dir(step), recorded, checksum.device_checksums(restored["state"])[0])
    return restored["state"], restored["meta"]

  def quarantine(self, step: int) -> str:
    """Moves checkpoints/<step> to corrupt/<step> so it is never picked again (on the primary process; the
    others wait), and returns the new path."""
    target = fs.join(self.workdir, "corrupt", f"{step}-{int(time.time())}")
    if distributed.is_primary():
      fs.makedirs(fs.join(self.workdir, "corrupt"))
      epath.Path(self.step_dir(step)).rename(target)
    distributed.sync(f"jaxlm:quarantine:{step}")
    self.latest.reload()
    return target

  def wait(self) -> None:
    """Blocks until every save in flight is written."""
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.latest.close()
    self.best.close()


def _verify(where: str, recorded: Dict[str, Any], actual: Dict[str, Any]) -> None:
  bad = checksum.mismatches(recorded, actual)
  if bad:
    raise CheckpointUnusable(f"{where}: {len(bad)} array(s) differ from what was written (checksum of "
                             f"{bad[0]}{' and others' if len(bad) > 1 else ''}): the files were damaged")


def restore_for_inference(workdir: str, which: str = "latest") -> Tuple[Dict[str, Any], Any, str]:
  """(model config dict, params as numpy arrays, local tokenizer dir) from a training workdir, checked against
  the recorded checksums."""
  if which not in ("latest", "best"):
    raise ValueError(f"--which must be 'latest' or 'best', got {which!r}")
  directory = fs.join(workdir, "checkpoints" if which == "latest" else "best")
  manager = _manager(directory, 1, read_only=True)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no {which} checkpoint in {workdir!r}")
  try:
    # Onto this process's first device, whatever devices wrote it (a run on one CPU device per core, a pod).
    saved = _quietly(lambda: ocp.StandardCheckpointer().metadata(fs.join(directory, str(step), "state")))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          getattr(saved, "item_metadata", saved))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                             meta=ocp.args.JsonRestore()))
  except Exception as e:  # noqa: BLE001
    raise CheckpointUnusable(f"{fs.join(directory, str(step))}: cannot be restored ({errors.root_cause(e)})") from e
  finally:
    manager.close()
  params = jax.tree.map(np.asarray, restored["state"]["params"])
  recorded = {k: v for k, v in restored["meta"].get("checksums", {}).items() if k.startswith("params/")}
  if recorded:
    _verify(fs.join(directory, str(step)), recorded, checksum.host_checksums({"params": params}))
  return restored["meta"]["model"], params, fs.local_dir(fs.join(workdir, "tokenizer"))
