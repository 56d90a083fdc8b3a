"""Orbax checkpoints of a training run: train state + Grain iterator state + run metadata.

Layout of a workdir:
  checkpoints/<step>/{state,data,meta}   the last `train.keep_checkpoints` steps
  best/<step>/{state,meta}               the step with the lowest eval loss so far (params only)
  tokenizer/tokenizer.json               the run's tokenizer (built once, reused on resume)
Orbax writes each step into a temporary directory and renames it when complete, so a crash during a save
leaves the previous checkpoint as the latest good one.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

try:  # Grain registers its iterator handler with Orbax on import.
  import grain
  _GRAIN_SAVE, _GRAIN_RESTORE = grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore
except (ImportError, AttributeError):  # pragma: no cover
  _GRAIN_SAVE = _GRAIN_RESTORE = None


def _manager(directory: str, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
  if read_only:  # Orbax logs a warning for each option a read-only manager ignores; there is nothing to act on
    options = ocp.CheckpointManagerOptions(create=False, read_only=True, save_interval_steps=0,
                                           enable_async_checkpointing=False)
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
      return ocp.CheckpointManager(os.path.abspath(directory), options=options)
    finally:
      absl_log.setLevel(level)
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class RunCheckpointer:
  """Saves/restores a run's state; keeps the last K steps and, separately, the best by eval loss."""

  def __init__(self, workdir: str, keep: int = 3):
    self.workdir = workdir
    self.latest = _manager(os.path.join(workdir, "checkpoints"), keep)
    self.best = _manager(os.path.join(workdir, "best"), 1)

  def latest_step(self) -> Optional[int]:
    return self.latest.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, meta: Dict[str, Any]) -> None:
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iter is not None:
      items["data"] = _GRAIN_SAVE(data_iter)
    self.latest.save(step, args=ocp.args.Composite(**items), force=True)
    self.latest.wait_until_finished()

  def save_best(self, step: int, params: Any, meta: Dict[str, Any]) -> None:
    if step in self.best.all_steps():
      return
    self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params}),
                                                 meta=ocp.args.JsonSave(meta)), force=True)
    self.best.wait_until_finished()

  def restore(self, step: int, abstract_state: Any, data_iter: Any) -> Tuple[Any, Dict[str, Any]]:
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if data_iter is not None:
      items["data"] = _GRAIN_RESTORE(data_iter)
    restored = self.latest.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["meta"]

  def read_meta(self, step: int) -> Dict[str, Any]:
    return self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def restore_for_inference(workdir: str, which: str = "latest") -> Tuple[Dict[str, Any], Any, str]:
  """(model config dict, params as numpy arrays, tokenizer dir) from a training workdir."""
  if which not in ("latest", "best"):
    raise ValueError(f"--which must be 'latest' or 'best', got {which!r}")
  manager = _manager(os.path.join(workdir, "checkpoints" if which == "latest" else "best"), 1, read_only=True)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no {which} checkpoint in {workdir!r}")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                           meta=ocp.args.JsonRestore()))
  manager.close()
  params = jax.tree.map(np.asarray, restored["state"]["params"])
  return restored["meta"]["model"], params, os.path.join(workdir, "tokenizer")


def write_json_atomic(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
