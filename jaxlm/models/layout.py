"""Parameter layouts, and the canonical one every tool reads.

Layers: one subtree per block ('layers_0', 'layers_1', ...) or, with `model.scan_layers`, one stacked subtree
('layers/block/...', a leading axis of n_layers).
Vocabulary: `model.vocab_multiple` pads every vocabulary axis (embedding rows, head columns and biases) to a
multiple of it inside the model (even sharding, aligned matmuls); the padded ids' logits never win.

The canonical layout (per-block, unpadded) is what inference, generation and the converters use: jaxlm.modeldir
converts a model to it when it loads one, so every tool reads every layout. All conversions are exact (stacking,
slicing and zero padding copy values).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import numpy as np
from flax import traverse_util

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
  """(model dict, params) in the per-block layout."""
  if not model_dict.get("scan_layers"):
    return dict(model_dict), dict(params)
  return {**model_dict, "scan_layers": False}, unstack_layers(params, int(model_dict["n_layers"]))


def vocab_axes(model_dict: Mapping[str, Any]) -> Dict[str, int]:
  """'path/to/param' -> the index of its vocabulary axis (from the parameters' logical axis names)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from jaxlm.models import build_model
  _, module = build_model(model_dict)
  boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]
  specs = traverse_util.flatten_dict(nn.get_partition_spec(boxed), sep="/")
  return {k: tuple(spec).index("vocab") for k, spec in specs.items() if spec is not None and "vocab" in tuple(spec)}


def padded_vocab(vocab_size: int, multiple: int) -> int:
  return -(-vocab_size // max(multiple, 1)) * max(multiple, 1)


def set_vocab_multiple(model_dict: Mapping[str, Any], params: Mapping[str, Any], multiple: int):
  """(model dict, params) with every vocabulary axis cut or zero-padded to padded_vocab(vocab_size, multiple)."""
  vocab = int(model_dict["vocab_size"])
  target = padded_vocab(vocab, multiple)
  new_dict = {**model_dict, "vocab_multiple": multiple}
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  for key, axis in vocab_axes(new_dict).items():
    value = np.asarray(flat[key])
    if value.shape[axis] > target:
      if np.any(np.take(value, range(target, value.shape[axis]), axis=axis)):
        raise ValueError(f"{key}: the padded vocabulary rows {target}..{value.shape[axis] - 1} are not zero")
      value = np.take(value, range(target), axis=axis)
    elif value.shape[axis] < target:
      widths = [(0, 0)] * value.ndim
      widths[axis] = (0, target - value.shape[axis])
      value = np.pad(value, widths)
    flat[key] = value
  return new_dict, traverse_util.unflatten_dict(flat, sep="/")


def canonical(model_dict: Mapping[str, Any], params: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Per-block, unpadded: the layout inference and the converters work on."""
  model_dict, params = to_per_block(model_dict, params)
  if int(model_dict.get("vocab_multiple", 1) or 1) > 1:
    model_dict, params = set_vocab_multiple(model_dict, params, 1)
  return model_dict, params
