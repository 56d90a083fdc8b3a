"""Depth growth during training: `train.grow_every_chars=N` adds `train.grow_layers` blocks (HRM: to both the L
and the H module) each time the stage has trained on another N characters, the HRM original's plan (about 1M
parameters every 3M characters). The blocks are jaxlm.grow's identity blocks, so the step after a growth computes
the loss the model would have computed without it. The optimizer state of the old parameters is kept (matched by
tree path; a stacked scan_layers array keeps its old layers' rows); `train.grow_reset_optimizer=True` starts the
optimizer afresh, as the original does.

Every process decides from the step number alone, so they all grow after the same step without a vote.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import numpy as np

from jaxlm import grow

# Model fields a growth changes: a resumed run takes them from its checkpoint, not from the config.
GROWN_FIELDS = ("n_layers", "attention_window", "l_layers", "h_layers")


def due(step: int, chars_per_step: float, every_chars: int) -> bool:
  """Whether step `step` (1-based, counted in this stage) crosses another multiple of `every_chars`."""
  if not every_chars or chars_per_step <= 0:
    return False
  return int(step * chars_per_step // every_chars) > int((step - 1) * chars_per_step // every_chars)


def grown_model(model_dict: Mapping[str, Any], params: Mapping[str, Any], k: int) -> Tuple[Dict, Dict]:
  """(model, params) with `k` identity blocks added (canonical layout in and out)."""
  if model_dict.get("arch", "decoder") == "hrm":
    return grow.add_hrm_layers(model_dict, params, k, k)
  if model_dict.get("arch", "decoder") != "decoder":
    raise ValueError(f"train.grow_every_chars: {model_dict.get('arch')!r} models cannot grow without changing "
                     "their function (see jaxlm.grow); set it to 0")
  return grow.add_layers(model_dict, params, k)


def check_growable(model_dict: Mapping[str, Any]) -> None:
  """Refuses at start, naming the field, what could not grow later."""
  arch = model_dict.get("arch", "decoder")
  if arch not in ("decoder", "hrm"):
    raise ValueError(f"train.grow_every_chars: {arch!r} models cannot grow without changing their function "
                     "(see jaxlm.grow); set it to 0")
  if model_dict.get("norm_position", "pre") != "pre":
    raise ValueError("train.grow_every_chars needs pre-norm blocks (model.norm_position='pre'): a post-norm block "
                     "has no identity initialisation")


def carry_over(old: Any, new: Any) -> Any:
  """`new` (a freshly initialised optimizer state, host arrays) with every leaf that `old` has at the same tree
  path copied from it; a leaf grown along its first axis (stacked layers) keeps the old leading rows."""
  old_leaves = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(old)[0]}

  def one(path, value):
    value = np.asarray(value)
    before = old_leaves.get(jax.tree_util.keystr(path))
    if before is None or before.ndim != value.ndim:
      return value
    if before.shape == value.shape:
      return before.astype(value.dtype)
    if before.shape[1:] == value.shape[1:] and before.shape[0] < value.shape[0]:
      out = value.copy()
      out[:before.shape[0]] = before
      return out
    return value
  return jax.tree_util.tree_map_with_path(one, new)


def event(step: int, chars: Optional[int], added: Dict[str, int], before: int, after: int, reset: bool,
          at: str) -> Dict[str, Any]:
  return {"kind": "layers", "step": int(step), "chars": chars, "added": added, "params_before": int(before),
          "params_after": int(after), "optimizer": "reset" if reset else "kept", "at": at, "automatic": True}


def resumed_model(config_model: Mapping[str, Any], saved_model: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
  """The model a resumed run builds: the config's, with the grown fields of its latest checkpoint's model when
  that one grew (every other field must still agree; the usual check reports it)."""
  model = dict(config_model)
  if saved_model:
    for key in GROWN_FIELDS:
      if key in saved_model and key in model and saved_model[key] != model[key]:
        model[key] = saved_model[key]
  return model
