"""Key/value cache for causal decoders: one ring buffer of keys, values and positions per layer.

A layer with full attention gets `length` slots; a sliding-window layer gets min(window, length) slots, so its
memory is O(window), not O(sequence). Token at absolute position p lives in slot p % size, and every slot
records the position it holds (-1 = empty), so the usual mask (`layers.attention_mask`) works on the slots
directly: causal, window and emptiness all come from positions. GQA caches only the kv heads.

If a full-attention layer runs past its `length` slots the ring keeps the last `length` positions, i.e. it
turns into a sliding window of that size (decoding longer than the context then streams instead of failing).

Models opt in through their config: a config with `causal=True` and a `kv_cache_layout` property
(per layer: (kv_heads, head_dim, window)) can be decoded with this cache; anything else (non-causal originals,
HRM) is decoded by full recompute.
"""
from __future__ import annotations

from typing import Any, List, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from jaxlm.models import layers

Array = jax.Array


def supports_cache(config: Any) -> bool:
  """True when `config` describes a causal model whose layers can use a KV cache."""
  return bool(getattr(config, "causal", False)) and hasattr(config, "kv_cache_layout")


@struct.dataclass
class LayerKV:
  """One layer's cache: keys/values [B, S, K, H] and the absolute position held by each slot [B, S]."""
  k_BxSxKxH: Array
  v_BxSxKxH: Array
  pos_BxS: Array
  window: int = struct.field(pytree_node=False, default=0)  # 0 = full attention

  @property
  def size(self) -> int:
    return self.pos_BxS.shape[1]

  def write(self, k_BxTxKxH: Array, v_BxTxKxH: Array, positions_BxT: Array, valid_BxT: Array) -> "LayerKV":
    """Stores the valid new tokens at slot position % size (per row; rows may be at different positions).

    Of a chunk longer than the buffer only the last `size` valid positions are kept; the rest (and padding)
    get distinct out-of-range slot indices and are dropped by the scatter, so all indices are unique.
    """
    s = self.size
    last_B = jnp.max(jnp.where(valid_BxT, positions_BxT, -1), axis=1)
    keep = valid_BxT & (positions_BxT > last_B[:, None] - s)
    slot_BxT = jnp.where(keep, positions_BxT % s, s + jnp.arange(positions_BxT.shape[1]))
    row_BxT = jnp.broadcast_to(jnp.arange(positions_BxT.shape[0])[:, None], slot_BxT.shape)

    def put(buf, new):
      return buf.at[row_BxT, slot_BxT].set(new.astype(buf.dtype), mode="drop", unique_indices=True)

    return self.replace(k_BxSxKxH=put(self.k_BxSxKxH, k_BxTxKxH), v_BxSxKxH=put(self.v_BxSxKxH, v_BxTxKxH),
                        pos_BxS=put(self.pos_BxS, positions_BxT.astype(jnp.int32)))

  def chunk(self, valid_BxT: Array) -> "Chunk":
    """This cache bound to a call's new tokens (the model passes it to its attention layer)."""
    return Chunk(self, valid_BxT)


@struct.dataclass
class Chunk:
  """What one attention layer receives for a cached call: its cache and which new tokens are real."""
  layer: LayerKV
  valid_BxT: Array

  def extend(self, k_BxTxKxH: Array, v_BxTxKxH: Array, positions_BxT: Array):
    """(keys, values, mask [B, 1, T, S'], updated LayerKV) for attending from the new tokens."""
    cache = self.layer
    updated = cache.write(k_BxTxKxH, v_BxTxKxH, positions_BxT, self.valid_BxT)
    if k_BxTxKxH.shape[1] == 1:
      # One token per row (the decode loop): write first, then attend over the buffer, which now holds the
      # query itself; the slot it overwrote was already outside the window.
      k, v, k_pos, k_valid = updated.k_BxSxKxH, updated.v_BxSxKxH, updated.pos_BxS, updated.pos_BxS >= 0
    else:
      # A chunk (the prompt) can be longer than a ring buffer: attend over old cache + chunk, write after.
      k = jnp.concatenate([cache.k_BxSxKxH, k_BxTxKxH.astype(cache.k_BxSxKxH.dtype)], axis=1)
      v = jnp.concatenate([cache.v_BxSxKxH, v_BxTxKxH.astype(cache.v_BxSxKxH.dtype)], axis=1)
      k_pos = jnp.concatenate([cache.pos_BxS, positions_BxT.astype(jnp.int32)], axis=1)
      k_valid = jnp.concatenate([cache.pos_BxS >= 0, self.valid_BxT.astype(bool)], axis=1)
    mask = layers.attention_mask(positions_BxT, k_pos, causal=True, window=cache.window or None,
                                 k_valid_BxS=k_valid)
    return k, v, mask, updated


def init_cache(config: Any, batch: int, length: int, dtype=None) -> List[LayerKV]:
  """Empty per-layer caches for `batch` rows and up to `length` positions (fewer for windowed layers)."""
  if not supports_cache(config):
    raise ValueError(f"model arch {getattr(config, 'arch', '?')!r} with causal={getattr(config, 'causal', None)} "
                     "cannot use a KV cache; decode it by full recompute")
  if length <= 0 or batch <= 0:
    raise ValueError(f"a KV cache needs batch > 0 and length > 0, got batch={batch}, length={length}")
  dtype = jnp.dtype(dtype or getattr(config, "dtype", "float32"))
  caches = []
  for kv_heads, head_dim, window in config.kv_cache_layout:
    size = min(window, length) if window else length
    zeros = jnp.zeros((batch, size, kv_heads, head_dim), dtype)
    caches.append(LayerKV(zeros, zeros, jnp.full((batch, size), -1, jnp.int32), window=int(window or 0)))
  return caches


def cache_bytes(caches: Sequence[LayerKV]) -> int:
  return sum(x.size * x.dtype.itemsize for c in caches for x in jax.tree.leaves(c))
