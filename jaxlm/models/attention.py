"""Attention: one mask definition and the implementations behind `model.attention_impl`.

  xla      a dense [B, 1, T, S] mask and [B, N, T, S] scores: dense_attention (the softmax with its backward
           written out), or explicit_attention (the reference the tests compare against) with attention dropout.
  chunked  memory-efficient, pure JAX: queries in blocks of `block_q`, and for each block an online softmax over
           key blocks of `block_k` (running max, running sum, rescaled accumulator). Each query block is
           rematerialised in the backward pass, so a layer keeps only q, k, v for it: memory is
           O(block_q x S) per step instead of O(T x S) per layer. Key blocks that the mask rules out entirely
           (beyond the causal diagonal, outside a sliding window) are skipped. The mask is built per block from
           positions, so no [T, S] array exists. Attention dropout draws its keep mask per (query block, key
           block) from the dropout key.
  cudnn    cuDNN flash attention through jax.nn.dot_product_attention(implementation='cudnn') on GPU, for the
           cases it expresses exactly: causal, sliding window, no padding/segment mask, no dropout, 16-bit inputs.
  splash   the Pallas splash kernel on TPU (models/splash.py): causal, windows on either side, padding and segment
           masks, GQA; no dropout or offsets. Elsewhere it runs in Pallas' interpreter (tests only: slow).
  auto     cudnn where it applies on a GPU, splash where it applies on a TPU, chunked for sequences of at least
           `CHUNKED_FROM` tokens, xla otherwise (short sequences: the dense path is fastest, its memory small).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import flax
import jax
import jax.numpy as jnp

from jaxlm.models import splash

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "splash")
CHUNKED_FROM = 512          # auto: sequences at least this long (queries or keys) take the chunked path
DEFAULT_BLOCK = 512


# ----------------------------------------------------------------------------------------------- masks
def attention_mask(q_pos_BxT: Array, k_pos_BxS: Array, *, causal: bool, window: Optional[int],
                   k_valid_BxS: Optional[Array] = None, q_segment_BxT: Optional[Array] = None,
                   k_segment_BxS: Optional[Array] = None) -> Array:
  """Boolean mask [B, 1, T, S], True = query may attend to key. One definition for every family.

  causal: key position <= query position.
  window W: key position > query position - W (the query and the W-1 keys before it when causal).
    With causal=False this is original YingGem's mask: everything from q - W + 1 onwards, the future included.
  k_valid: False for padding keys (and for empty cache slots).
  segments: a query attends only to keys of its own segment (packed documents).
  """
  return _allowed(q_pos_BxT, k_pos_BxS, causal, window, k_valid_BxS, q_segment_BxT, k_segment_BxS)[:, None]


def _allowed(q_pos_BxT, k_pos_BxS, causal, window, k_valid_BxS, q_seg_BxT, k_seg_BxS,
             layer_window=None) -> Array:
  """[B, T, S] booleans of attention_mask (its definition, shared by the dense mask and each block).
  `layer_window`: a window given as data (scanned layers with different windows; <= 0 = none)."""
  q = q_pos_BxT[:, :, None]
  k = k_pos_BxS[:, None, :]
  mask = jnp.ones(jnp.broadcast_shapes(q.shape, k.shape), dtype=bool)
  if causal:
    mask &= k <= q
  if window is not None:
    mask &= k > q - window
  if layer_window is not None:
    mask &= (layer_window <= 0) | (k > q - layer_window)
  if k_valid_BxS is not None:
    mask &= k_valid_BxS[:, None, :].astype(bool)
  if q_seg_BxT is not None:
    mask &= q_seg_BxT[:, :, None] == k_seg_BxS[:, None, :]
  return mask


@flax.struct.dataclass
class MaskSpec:
  """A mask described by positions (what the chunked path needs) rather than a dense [B, 1, T, S] array.

  `window` 0/None = no window. Segment ids are optional (packed sequences); k_valid marks real keys.
  """
  q_pos_BxT: Array
  k_pos_BxS: Array
  k_valid_BxS: Optional[Array] = None
  q_segment_BxT: Optional[Array] = None
  k_segment_BxS: Optional[Array] = None
  causal: bool = flax.struct.field(pytree_node=False, default=True)
  window: Optional[int] = flax.struct.field(pytree_node=False, default=None)
  arange_positions: bool = flax.struct.field(pytree_node=False, default=False)  # positions are 0..T-1 per row
  layer_window: Optional[Array] = None  # a window as data (scanned layers whose windows differ); <= 0 = none

  def dense(self) -> Array:
    return self.allowed(self.q_pos_BxT, self.k_pos_BxS, self.k_valid_BxS, self.q_segment_BxT,
                        self.k_segment_BxS)[:, None]

  def allowed(self, q_pos, k_pos, k_valid, q_seg, k_seg) -> Array:
    """[B, T', S'] booleans for a tile of queries and keys (the whole mask when given everything)."""
    return _allowed(q_pos, k_pos, self.causal, self.window or None, k_valid, q_seg, k_seg, self.layer_window)

  @property
  def plain(self) -> bool:
    """Only causal/window structure on positions 0..T-1 (no padding, segments or offsets): what cuDNN's flags
    can express."""
    return (self.arange_positions and self.k_valid_BxS is None and self.q_segment_BxT is None
            and self.layer_window is None)


# ----------------------------------------------------------------------------------------------- the reference
def explicit_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_Bx1xTxS: Array, *,
                       dropout_rate: float = 0.0, dropout_rng: Optional[Array] = None,
                       keep_BxKxGxTxS: Optional[Array] = None) -> Array:
  """softmax(q k^T / sqrt(H)) v written out, with optional dropout on the probabilities.

  Heads go first ([B, K, G, T, H]) so both products are plain batched matmuls. `keep_BxKxGxTxS` replaces the
  dropout draw (tests use it to apply the chunked path's keep mask).
  """
  b, t, n, h = q_BxTxNxH.shape
  k = k_BxSxKxH.shape[2]
  q_BxKxGxTxH = q_BxTxNxH.reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)
  k_BxKxSxH = k_BxSxKxH.transpose(0, 2, 1, 3)
  v_BxKxSxH = v_BxSxKxH.transpose(0, 2, 1, 3)
  scores = jnp.einsum("bkgth,bksh->bkgts", q_BxKxGxTxH, k_BxKxSxH).astype(jnp.float32) / jnp.sqrt(h)
  scores = jnp.where(mask_Bx1xTxS[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  if dropout_rate > 0.0:
    keep = keep_BxKxGxTxS if keep_BxKxGxTxS is not None else jax.random.bernoulli(
        dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum("bkgts,bksh->bkgth", probs.astype(v_BxSxKxH.dtype), v_BxKxSxH)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# ----------------------------------------------------------------------------------------------- xla, no dropout
# The dense softmax with its backward written out (the FlashAttention form, dS = P * (dP - rowsum(dO * O))): autodiff
# of the softmax costs XLA:CPU a reduction over a transposed layout and more copies per layer, and this short-sequence
# path is what CPU training runs (bench/README.md). Values equal explicit_attention's; no dropout here.
@jax.custom_vjp
def _dense_heads(q_BxTxNxH: Array, k_BxSxNxH: Array, v_BxSxNxH: Array, mask_Bx1xTxS: Array) -> Array:
  return _dense_forward(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, mask_Bx1xTxS)[0]


def _dense_forward(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, mask_Bx1xTxS):
  scale = 1.0 / math.sqrt(q_BxTxNxH.shape[-1])
  scores = jnp.einsum("btnh,bsnh->bnts", q_BxTxNxH, k_BxSxNxH).astype(jnp.float32) * scale
  scores = jnp.where(mask_Bx1xTxS, scores, jnp.finfo(jnp.float32).min)
  probs_BxNxTxS = jax.nn.softmax(scores, axis=-1)
  out_BxTxNxH = jnp.einsum("bnts,bsnh->btnh", probs_BxNxTxS.astype(v_BxSxNxH.dtype), v_BxSxNxH)
  return out_BxTxNxH, (q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, mask_Bx1xTxS, probs_BxNxTxS, out_BxTxNxH)


def _dense_backward(residuals, d_out_BxTxNxH):
  q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, mask_Bx1xTxS, probs_BxNxTxS, out_BxTxNxH = residuals
  scale = 1.0 / math.sqrt(q_BxTxNxH.shape[-1])
  d_v = jnp.einsum("bnts,btnh->bsnh", probs_BxNxTxS.astype(d_out_BxTxNxH.dtype), d_out_BxTxNxH)
  d_probs = jnp.einsum("btnh,bsnh->bnts", d_out_BxTxNxH, v_BxSxNxH).astype(jnp.float32)
  # rowsum(P * dP) = rowsum(dO * O): the smaller product (H per row instead of S).
  row_BxNxT = jnp.einsum("btnh,btnh->bnt", d_out_BxTxNxH.astype(jnp.float32), out_BxTxNxH.astype(jnp.float32))
  d_scores = probs_BxNxTxS * (d_probs - row_BxNxT[..., None]) * scale
  # Masked scores get no gradient (it matters in rows without any allowed key, where P is uniform).
  d_scores = jnp.where(mask_Bx1xTxS, d_scores, 0.0).astype(q_BxTxNxH.dtype)
  d_q = jnp.einsum("bnts,bsnh->btnh", d_scores, k_BxSxNxH)
  d_k = jnp.einsum("bnts,btnh->bsnh", d_scores, q_BxTxNxH)
  return d_q, d_k, d_v, None


_dense_heads.defvjp(_dense_forward, _dense_backward)


def dense_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_Bx1xTxS: Array) -> Array:
  """softmax(q k^T / sqrt(H)) v under a dense boolean mask [B, 1, T, S]; no dropout. GQA repeats each kv head for
  its query heads (autodiff sums their gradients back): this path serves short sequences only."""
  groups = q_BxTxNxH.shape[2] // k_BxSxKxH.shape[2]
  if groups > 1:
    k_BxSxKxH = jnp.repeat(k_BxSxKxH, groups, axis=2)
    v_BxSxKxH = jnp.repeat(v_BxSxKxH, groups, axis=2)
  return _dense_heads(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS.astype(bool))


def dot_product_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_Bx1xTxS: Array, *,
                          dropout_rate: float = 0.0, deterministic: bool = True,
                          dropout_rng: Optional[Array] = None) -> Array:
  """The xla implementation: dense_attention without dropout, the explicit softmax with it."""
  n, k = q_BxTxNxH.shape[2], k_BxSxKxH.shape[2]
  if n % k:
    raise ValueError(f"{n} query heads are not a multiple of {k} kv heads")
  if deterministic or dropout_rate == 0.0:
    return dense_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS)
  return explicit_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, dropout_rate=dropout_rate,
                            dropout_rng=dropout_rng)


# ----------------------------------------------------------------------------------------------- chunked
def block_dropout_keep(rng: Array, q_block: Array, k_block: Array, rate: float, shape) -> Array:
  """The chunked path's keep mask for one (query block, key block) tile: a pure function of the key and the
  tile's indices, so the backward pass redraws exactly what the forward pass used."""
  return jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(rng, q_block), k_block), 1.0 - rate, shape)


def _pad_axis(x: Array, axis: int, size: int, value=0) -> Array:
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _blocks(x: Array, n_blocks: int) -> Array:
  """[B, L, ...] -> [n_blocks, B, L / n_blocks, ...] (the scan axis first)."""
  b, length = x.shape[:2]
  return jnp.moveaxis(x.reshape((b, n_blocks, length // n_blocks) + x.shape[2:]), 1, 0)


def chunked_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, spec: MaskSpec, *,
                      block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK, dropout_rate: float = 0.0,
                      dropout_rng: Optional[Array] = None) -> Array:
  """Attention with an online softmax over key blocks; equal to the reference up to float rounding.

  A query row with no allowed key returns zeros (the reference averages every value there; such rows are
  padding and never reach a loss).
  """
  b, t, n, h = q_BxTxNxH.shape
  s, kv = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
  if n % kv:
    raise ValueError(f"{n} query heads are not a multiple of {kv} kv heads")
  g = n // kv
  block_q, block_k = min(block_q, t), min(block_k, s)
  nq, nk = -(-t // block_q), -(-s // block_k)
  tp, sp = nq * block_q, nk * block_k
  scale = 1.0 / math.sqrt(h)
  dropping = dropout_rate > 0.0

  k_valid = spec.k_valid_BxS if spec.k_valid_BxS is not None else jnp.ones((b, s), bool)
  q_seg = spec.q_segment_BxT if spec.q_segment_BxT is not None else jnp.zeros((b, t), jnp.int32)
  k_seg = spec.k_segment_BxS if spec.k_segment_BxS is not None else jnp.zeros((b, s), jnp.int32)
  q_pos = jnp.broadcast_to(spec.q_pos_BxT, (b, t))
  k_pos = jnp.broadcast_to(spec.k_pos_BxS, (b, s))
  # Padding to whole blocks: padded keys are invalid, padded queries are cut off at the end.
  q_tiles = _blocks(_pad_axis(q_BxTxNxH.reshape(b, t, kv, g, h), 1, tp), nq)      # [nq, B, Cq, K, G, H]
  qpos_tiles = _blocks(_pad_axis(q_pos, 1, tp), nq)
  qseg_tiles = _blocks(_pad_axis(q_seg, 1, tp), nq)
  k_tiles = _blocks(_pad_axis(k_BxSxKxH, 1, sp), nk)                              # [nk, B, Ck, K, H]
  v_tiles = _blocks(_pad_axis(v_BxSxKxH, 1, sp), nk)
  kpos_tiles = _blocks(_pad_axis(k_pos, 1, sp), nk)
  kvalid_tiles = _blocks(_pad_axis(k_valid.astype(bool), 1, sp, False), nk)
  kseg_tiles = _blocks(_pad_axis(k_seg, 1, sp), nk)

  def query_block(args):
    qi, q_tile, qpos, qseg = args

    def key_block(carry, xs):
      ki, k_tile, v_tile, kpos, kvalid, kseg = xs
      allowed_BxCqxCk = spec.allowed(qpos, kpos, kvalid, qseg, kseg)

      def accumulate(carry):
        m, l, acc = carry
        scores = jnp.einsum("bqkgh,bckh->bkgqc", q_tile, k_tile).astype(jnp.float32) * scale
        scores = jnp.where(allowed_BxCqxCk[:, None, None], scores, -jnp.inf)
        # The running max only keeps exp() in range; the result does not depend on it, so no gradient
        # flows through it.
        m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(scores, axis=-1)))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        probs = jnp.exp(scores - m_safe[..., None])
        rescale = jnp.exp(m - m_safe)
        l_new = l * rescale + jnp.sum(probs, axis=-1)
        if dropping:
          keep = block_dropout_keep(dropout_rng, qi, ki, dropout_rate, probs.shape)
          probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
        pv = jnp.einsum("bkgqc,bckh->bkgqh", probs.astype(v_tile.dtype), v_tile).astype(jnp.float32)
        return m_new, l_new, acc * rescale[..., None] + pv

      return jax.lax.cond(jnp.any(allowed_BxCqxCk), accumulate, lambda c: c, carry), None

    init = (jnp.full((b, kv, g, block_q), -jnp.inf, jnp.float32), jnp.zeros((b, kv, g, block_q), jnp.float32),
            jnp.zeros((b, kv, g, block_q, h), jnp.float32))
    (_, l, acc), _ = jax.lax.scan(key_block, init, (jnp.arange(nk), k_tiles, v_tiles, kpos_tiles, kvalid_tiles,
                                                     kseg_tiles))
    out_BxKxGxCqxH = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out_BxKxGxCqxH.transpose(0, 3, 1, 2, 4).reshape(b, block_q, n, h).astype(q_BxTxNxH.dtype)

  # Rematerialised per query block: the backward pass recomputes a block's scores instead of storing them.
  out_tiles = jax.lax.map(jax.checkpoint(query_block), (jnp.arange(nq), q_tiles, qpos_tiles, qseg_tiles))
  return jnp.moveaxis(out_tiles, 0, 1).reshape(b, tp, n, h)[:, :t]


# ----------------------------------------------------------------------------------------------- cuDNN
def cudnn_window(spec: MaskSpec):
  """jax.nn.dot_product_attention's (is_causal, local_window_size) for a plain causal mask, or None."""
  if not spec.causal or not spec.plain:
    return None
  return True, ((spec.window - 1, 0) if spec.window else None)


def cudnn_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, spec: MaskSpec, implementation: str = "cudnn"):
  """The flags-only form of a plain mask (see MaskSpec.plain). `implementation='xla'` runs the same call on any
  backend (tests check the flag translation with it)."""
  is_causal, window = cudnn_window(spec)
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, is_causal=is_causal,
                                      local_window_size=window, implementation=implementation)


# ----------------------------------------------------------------------------------------------- dispatch
def resolve_impl(impl: str, *, q_len: int, k_len: int, dtype, spec_is_plain: bool, dropout: bool,
                 backend: Optional[str] = None, splash_fits: bool = False) -> str:
  """The implementation `auto` stands for in this case (explicit choices are returned unchanged).
  splash_fits: the splash kernel can compute this case (splash.unsupported found nothing)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention_impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  if backend == "tpu" and splash_fits:
    return "splash"
  if (backend == "gpu" and spec_is_plain and not dropout and q_len == k_len
      and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))):
    return "cudnn"
  return "chunked" if max(q_len, k_len) >= CHUNKED_FROM else "xla"


def attend(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask: Union[MaskSpec, Array], *,
           impl: str = "xla", dropout_rate: float = 0.0, deterministic: bool = True,
           dropout_rng: Optional[Array] = None, block_q: int = DEFAULT_BLOCK,
           block_k: int = DEFAULT_BLOCK) -> Array:
  """Scaled dot-product attention with GQA through the chosen implementation.

  `mask` is a MaskSpec (any implementation) or a dense [B, 1, T, S] array (the xla path only: cached decoding
  builds its mask from the cache's slots).
  """
  dropout = not deterministic and dropout_rate > 0.0
  if not isinstance(mask, MaskSpec):
    return dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, dropout_rate=dropout_rate,
                                 deterministic=deterministic, dropout_rng=dropout_rng)
  t, s = q_BxTxNxH.shape[1], k_BxSxKxH.shape[1]
  chosen = resolve_impl(impl, q_len=t, k_len=s, dtype=q_BxTxNxH.dtype, spec_is_plain=mask.plain, dropout=dropout,
                        splash_fits=splash.unsupported(mask, t, s, dropout, block_q) is None)
  if chosen == "splash":
    if dropout:
      raise ValueError("model.attention_impl='splash' has no attention dropout; use 'auto' to fall back elsewhere")
    return splash.splash_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, block=block_q)
  if chosen == "cudnn":
    if dropout or cudnn_window(mask) is None:
      raise ValueError("model.attention_impl='cudnn' covers causal attention (with or without a sliding window) "
                       "without padding, segments or attention dropout; use 'auto' to fall back elsewhere")
    return cudnn_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask)
  if chosen == "chunked":
    return chunked_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, block_q=block_q, block_k=block_k,
                             dropout_rate=dropout_rate if dropout else 0.0, dropout_rng=dropout_rng)
  return dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask.dense(), dropout_rate=dropout_rate,
                               deterministic=deterministic, dropout_rng=dropout_rng)
