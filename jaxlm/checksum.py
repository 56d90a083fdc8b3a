"""Checksums of array trees that do not depend on how the arrays are sharded, so a checkpoint verifies itself.

For each array, the raw bits of every element are read as unsigned integers and two sums are taken modulo 2**32:
the plain sum and the sum weighted by the element's (1-based) flat position, so a changed, swapped or shifted
value changes one of them. Wrapping unsigned addition is associative and commutative, so the result is exact
whatever the reduction order: the same on 1 device or sharded over 2 processes x 4 devices, and the same in
NumPy (`host_checksums`) as on the devices (`device_checksums`). The same pass says whether every float is
finite.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _leaf_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _device_leaf(x: jax.Array) -> jax.Array:
  """[sum, weighted sum, all finite] as uint32."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  width = x.dtype.itemsize
  if width not in _UNSIGNED:
    raise ValueError(f"no checksum for dtype {x.dtype}")
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.bool_(True)
  bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[width]).astype(jnp.uint32).reshape(-1)
  position = jnp.arange(1, bits.size + 1, dtype=jnp.uint32)
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * position, dtype=jnp.uint32),
                    finite.astype(jnp.uint32)])


@jax.jit
def _device_all(tree):
  return jax.tree.map(_device_leaf, tree)


def device_checksums(tree: Any) -> Tuple[Dict[str, Tuple[int, int]], bool]:
  """({leaf path: (sum, weighted sum)}, every float finite) of a tree of (possibly sharded) jax arrays.
  Every process of a run must call it (it is one jitted program over the global arrays)."""
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(_device_all(tree)))[0]
  sums = {_leaf_name(path): (int(v[0]), int(v[1])) for path, v in flat}
  return sums, all(bool(v[2]) for _, v in flat)


def host_checksums(tree: Any) -> Dict[str, Tuple[int, int]]:
  """The same sums computed in NumPy from host arrays (for checkpoints read without devices)."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    x = np.asarray(x)
    bits = x.reshape(-1).view(_UNSIGNED[x.dtype.itemsize]).astype(np.uint32)
    position = np.arange(1, bits.size + 1, dtype=np.uint32)
    out[_leaf_name(path)] = (int(bits.sum(dtype=np.uint32)), int((bits * position).sum(dtype=np.uint32)))
  return out


def leaf_names(tree: Any) -> list:
  """The leaf paths the checksums are keyed by (arrays or abstract ShapeDtypeStructs alike)."""
  return [_leaf_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def mismatches(expected: Dict[str, Any], actual: Dict[str, Tuple[int, int]]) -> list:
  """Leaf paths whose checksum differs from the recorded one (or that are missing on either side)."""
  expected = {k: tuple(v) for k, v in expected.items()}
  return sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
