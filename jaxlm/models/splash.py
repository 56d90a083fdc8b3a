"""TPU attention through the Pallas splash kernel (jax.experimental.pallas.ops.tpu.splash_attention).

Splash computes softmax(q k^T) v blockwise on the TPU with a mask known when the step is traced: a static mask
object per head (causal, a local window on either side, or full) plus optional segment ids compared per query and
key. jaxlm's MaskSpec maps onto that when its positions are 0..T-1 in every row (training, scoring):

  causal, window W        LocalMask(left W - 1, right 0)       (CausalMask without a window)
  window W, not causal    LocalMask(left W - 1, right None)    original YingGem: the future within reach too
  neither                 FullMask
  padding keys, segments  SegmentIds: query ids = segment (or 0), key ids = segment, or -1 for a padding key

Grouped-query attention runs the multi-query kernel once per kv head (its G query heads share one k and v).
Splash does not scale q, so q is multiplied by 1/sqrt(head_dim) first. Attention dropout, offsets (cached
decoding) and windows given as data (scanned layers whose windows differ) have no splash form: `unsupported`
says why, and `auto` takes the chunked path for them.

A Pallas call is opaque to XLA's partitioner, so under a mesh (sharding.activation_sharding) the kernel runs in a
shard_map: each device attends its own rows, and its own heads where the model axis divides the kv heads.
Off TPU the kernel runs in Pallas' interpreter (slow, exact): what the CPU tests compare with the reference.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxlm import sharding

Array = jax.Array
LANE = 128  # the TPU kernel's block sizes are multiples of this


def unsupported(spec, q_len: int, k_len: int, dropout: bool, block: int) -> Optional[str]:
  """Why splash cannot compute this case (None if it can)."""
  if dropout:
    return "attention dropout"
  if not spec.arange_positions or q_len != k_len:
    return "positions other than 0..T-1 (cached decoding or offsets)"
  if spec.layer_window is not None:
    return "per-layer windows given as data (scan_layers with windows that differ between layers)"
  if q_len % _block(q_len, block):
    return f"a length of {q_len}, not a multiple of the block size {_block(q_len, block)}"
  return None


def _block(length: int, block: int) -> int:
  """The kernel's block: `block` rounded down to a multiple of 128, at most the length."""
  return min(length, max(LANE, block // LANE * LANE))


def _head_mask(spec, length: int):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  shape, window = (length, length), spec.window or None
  if spec.causal:
    return masks.LocalMask(shape, (window - 1, 0), 0) if window else masks.CausalMask(shape)
  return masks.LocalMask(shape, (window - 1, None), 0) if window else masks.FullMask(shape)


def _segment_ids(spec, b: int, t: int):
  """(query ids [B, T], key ids [B, T]) int32, or None when neither padding nor segments restrict the keys."""
  if spec.k_valid_BxS is None and spec.q_segment_BxT is None:
    return None
  q_ids = jnp.zeros((b, t), jnp.int32) if spec.q_segment_BxT is None else spec.q_segment_BxT.astype(jnp.int32)
  k_ids = jnp.zeros((b, t), jnp.int32) if spec.k_segment_BxS is None else spec.k_segment_BxS.astype(jnp.int32)
  if spec.k_valid_BxS is not None:
    k_ids = jnp.where(spec.k_valid_BxS.astype(bool), k_ids, -1)  # matches no query (segment ids are >= 0)
  return q_ids, k_ids


def _kernel(spec, heads: int, length: int, block: int, mqa: bool, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  bq = _block(length, block)
  sizes = kernel.BlockSizes(block_q=bq, block_kv=bq, block_kv_compute=bq, block_q_dkv=bq, block_kv_dkv=bq,
                            block_kv_dkv_compute=bq, block_q_dq=bq, block_kv_dq=bq)
  mask = masks.MultiHeadMask([_head_mask(spec, length) for _ in range(heads)])
  make = kernel.make_splash_mqa_single_device if mqa else kernel.make_splash_mha_single_device
  return make(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, spec, *, block: int = 512,
                     interpret: Optional[bool] = None) -> Array:
  """attention.attend's result through the splash kernel (see `unsupported` for the cases it refuses)."""
  b, t, n, h = q_BxTxNxH.shape
  kv = k_BxSxKxH.shape[2]
  reason = unsupported(spec, t, k_BxSxKxH.shape[1], False, block)
  if reason:
    raise ValueError(f"model.attention_impl='splash' cannot compute {reason}; use 'auto' to fall back elsewhere")
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  q_BxNxTxH = (q_BxTxNxH * jnp.asarray(1.0 / math.sqrt(h), q_BxTxNxH.dtype)).transpose(0, 2, 1, 3)
  k_BxKxSxH, v_BxKxSxH = k_BxSxKxH.transpose(0, 2, 1, 3), v_BxSxKxH.transpose(0, 2, 1, 3)
  segments = _segment_ids(spec, b, t)
  from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

  def local(q_BxNxTxH, k_BxKxSxH, v_BxKxSxH, *segment_arrays):
    """On one device's rows (and heads): the kernel per example, per kv head when the heads are grouped."""
    n_local, kv_local = q_BxNxTxH.shape[1], k_BxKxSxH.shape[1]
    mqa = n_local != kv_local
    kernel = _kernel(spec, n_local // kv_local if mqa else n_local, t, block, mqa, interpret)

    def one_example(q_NxTxH, k_KxSxH, v_KxSxH, *ids):
      seg = SegmentIds(*ids) if ids else None
      if not mqa:
        return kernel(q_NxTxH, k_KxSxH, v_KxSxH, segment_ids=seg)
      q_KxGxTxH = q_NxTxH.reshape(kv_local, -1, t, h)
      out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=seg))(q_KxGxTxH, k_KxSxH, v_KxSxH)
      return out.reshape(n_local, t, h)

    return jax.vmap(one_example)(q_BxNxTxH, k_BxKxSxH, v_BxKxSxH, *segment_arrays)

  args = (q_BxNxTxH, k_BxKxSxH, v_BxKxSxH) + (segments or ())
  out_BxNxTxH = _on_mesh(local, args, kv)
  return out_BxNxTxH.transpose(0, 2, 1, 3).astype(q_BxTxNxH.dtype)


def _on_mesh(local, args, kv_heads: int) -> Array:
  """local(*args) in a shard_map over the active mesh (rows by the batch rule; heads by the kv_heads rule when the
  mesh divides the kv heads, so every device keeps whole groups of query heads), or directly without one."""
  active = sharding.active_mesh()
  if active is None:
    return local(*args)
  mesh, rules = active
  batch_axes = sharding.spec_for((args[0].shape[0],), ("batch",), mesh, rules)[0]
  head_axes = sharding.spec_for((kv_heads,), ("kv_heads",), mesh, rules)[0]
  qkv, ids = P(batch_axes, head_axes, None, None), P(batch_axes, None)
  in_specs = (qkv, qkv, qkv) + (ids,) * (len(args) - 3)
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=qkv, check_vma=False)(*args)
