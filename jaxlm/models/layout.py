"""The two parameter layouts of a decoder: one subtree per block ('layers_0', 'layers_1', ...) and, with
`model.scan_layers`, one stacked subtree ('layers/block/...', a leading axis of n_layers).

Inference, generation and the converters work on the per-block layout; jaxlm.modeldir unstacks a scanned model
when it loads one, so every tool reads both. Both functions are exact (stacking and slicing copy values).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import numpy as np

STACK, BLOCK = "layers", "block"


def is_stacked(params: Mapping[str, Any]) -> bool:
  return STACK in params and BLOCK in params[STACK]


def _tree_map(fn, tree):
  return {k: _tree_map(fn, v) for k, v in tree.items()} if isinstance(tree, Mapping) else fn(tree)


def unstack_layers(params: Mapping[str, Any], n_layers: int) -> Dict[str, Any]:
  """'layers/block/...' [L, ...] -> 'layers_i/...' [...] (other entries unchanged)."""
  out = {k: v for k, v in params.items() if k != STACK}
  for i in range(n_layers):
    out[f"layers_{i}"] = _tree_map(lambda a, i=i: np.array(np.asarray(a)[i]), params[STACK][BLOCK])
  return out


def stack_layers(params: Mapping[str, Any], n_layers: int) -> Dict[str, Any]:
  """'layers_i/...' -> 'layers/block/...' with a leading axis of n_layers."""
  blocks = [params[f"layers_{i}"] for i in range(n_layers)]
  out = {k: v for k, v in params.items() if not (k.startswith("layers_") and k[7:].isdigit())}

  def stack(*leaves):
    return np.stack([np.asarray(x) for x in leaves])

  def zip_trees(trees):
    first = trees[0]
    if isinstance(first, Mapping):
      return {k: zip_trees([t[k] for t in trees]) for k in first}
    return stack(*trees)

  out[STACK] = {BLOCK: zip_trees(blocks)}
  return out


def to_per_block(model_dict: Mapping[str, Any], params: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(model dict, params) in the per-block layout: what inference and the converters use."""
  if not model_dict.get("scan_layers"):
    return dict(model_dict), dict(params)
  return {**model_dict, "scan_layers": False}, unstack_layers(params, int(model_dict["n_layers"]))
