"""Building blocks shared by every jaxlm decoder.

Shapes use suffixes: B batch, T query length, S key length, D model width, N query heads, K kv heads,
H head dim, F MLP width, V vocabulary. Every parameter carries logical axis names (see sharding.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import sharding
from jaxlm.models import attention

Array = jax.Array

# Logical axis names used on parameters and activations.
EMBED, VOCAB, MLP, HEADS, KV_HEADS, HEAD_DIM = "embed", "vocab", "mlp", "heads", "kv_heads", "head_dim"
LAYERS = "layers"  # the stacked axis of scanned layers
# Activations only: the batch, and the sequence and width of activations, which no default rule shards (the embed
# name of parameters is FSDP's axis; an activation's width stays whole on a device).
BATCH, ACT_LENGTH, ACT_EMBED = "batch", "activation_length", "activation_embed"


def _init(stddev: float, names: tuple):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


def _init_real_vocab(stddev: float, names: tuple, vocab_size: int):
  """Normal init whose entries beyond the first `vocab_size` along the 'vocab' axis are zero (padding ids: never
  looked up, their logits masked, so they get no gradient and stay zero)."""
  axis = names.index(VOCAB)

  def init(key, shape, dtype=jnp.float32):
    value = nn.initializers.normal(stddev)(key, shape, dtype)
    real = jnp.arange(shape[axis]) < vocab_size
    return jnp.where(real.reshape([-1 if i == axis else 1 for i in range(len(shape))]), value, 0)

  return nn.with_logical_partitioning(init, names)


def mask_padding_ids(logits_xV: Array, vocab_size: int) -> Array:
  """Logits whose padding ids (model.vocab_multiple's rows from `vocab_size` on) never win: set to float32's
  lowest. They stay in the array, so the vocabulary axis keeps its evenly sharded, padded width."""
  if logits_xV.shape[-1] == vocab_size:
    return logits_xV
  return jnp.where(jnp.arange(logits_xV.shape[-1]) < vocab_size, logits_xV, jnp.finfo(jnp.float32).min)


def _zeros(names: tuple):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names: tuple):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


class RMSNorm(nn.Module):
  """weight * x / sqrt(mean(x^2) + eps), computed in float32 and cast back."""
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", _ones((EMBED,)), (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


class LayerNorm(nn.Module):
  """Standard LayerNorm with weight and bias (torch defaults: eps 1e-5, biased variance)."""
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param("scale", _ones((EMBED,)), (d,), jnp.float32)
    bias = self.param("bias", _zeros((EMBED,)), (d,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale + bias).astype(self.dtype)


def make_norm(kind: str, eps: float, dtype, name: str) -> nn.Module:
  if kind == "rms":
    return RMSNorm(eps=eps, dtype=dtype, name=name)
  if kind == "layer":
    return LayerNorm(eps=eps, dtype=dtype, name=name)
  raise ValueError(f"model.norm must be 'rms' or 'layer', got {kind!r}")


# ----------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(head_dim: int, theta: float) -> Array:
  """1 / theta^(2i/H) for i < H/2, in float32 as both originals compute it."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def _rope_cos_sin(positions_BxT: Array, head_dim: int, theta: float) -> Tuple[Array, Array]:
  angles_BxTxh = positions_BxT.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)
  return jnp.cos(angles_BxTxh)[:, :, None, :], jnp.sin(angles_BxTxh)[:, :, None, :]


def apply_rope(x_BxTxNxH: Array, positions_BxT: Array, theta: float, style: str, *, arange: bool = False) -> Array:
  """Rotary embedding at integer positions (cache offsets are just larger positions).

  style 'half': GPT-NeoX rotate-half, pairs (x[i], x[i + H/2]) (HROM, YingGem).
  style 'interleaved': pairs (x[2i], x[2i+1]) (torchtune / Optimus Prime, Meta Llama).
  arange: the positions are 0..T-1 in every row (a training or scoring step). The angles' cosines and sines are
  then one [T, H/2] table computed while tracing, a constant of the program: computed in the program, XLA fuses
  them into each of their uses and so evaluates them again per head, per row and per use (forward and backward),
  ~5% of yinggem:tiny's CPU step.
  """
  head_dim = x_BxTxNxH.shape[-1]
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
  if arange:
    with jax.ensure_compile_time_eval():
      cos, sin = _rope_cos_sin(jnp.arange(x_BxTxNxH.shape[1], dtype=jnp.int32)[None], head_dim, theta)
  else:
    cos, sin = _rope_cos_sin(positions_BxT, head_dim, theta)
  x = x_BxTxNxH.astype(jnp.float32)
  if style == "half":
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  elif style == "interleaved":
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
  else:
    raise ValueError(f"model.rope_style must be 'half' or 'interleaved', got {style!r}")
  return out.astype(x_BxTxNxH.dtype)


# ----------------------------------------------------------------------------------------------- attention
# The mask and the implementations live in attention.py; these names stay importable from here.
attention_mask = attention.attention_mask
dot_product_attention = attention.dot_product_attention
explicit_attention = attention.explicit_attention


class Attention(nn.Module):
  """Multi-head / grouped-query attention with rotary positions and a configurable mask."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_style: str = "half"
  qkv_bias: bool = False
  out_bias: bool = False
  dropout_rate: float = 0.0
  init_std: float = 0.02
  out_init_std: Optional[float] = None
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "xla"     # see attention.py; a dense mask always takes the xla path
  attention_block: int = attention.DEFAULT_BLOCK

  @nn.compact
  def __call__(self, x_BxTxD: Array, positions_BxT: Array, mask_Bx1xTxS, *,
               deterministic: bool = True, cache=None):
    """mask_Bx1xTxS: a dense boolean mask or an attention.MaskSpec.
    cache: None; a dict {"update": fn(k, v) -> (k, v)} (a hook: `mask` must then cover its keys); or a
    kv_cache.Chunk, which builds the keys and the mask itself: the call then returns (out, updated LayerKV).
    """
    d = x_BxTxD.shape[-1]

    def proj(name, heads, head_axis):
      h_BxTxNxH = nn.DenseGeneral(
          (heads, self.head_dim), use_bias=self.qkv_bias, dtype=self.dtype, name=name,
          kernel_init=_init(self.init_std, (EMBED, head_axis, HEAD_DIM)),
          bias_init=_zeros((head_axis, HEAD_DIM)))(x_BxTxD)
      return sharding.constrain(h_BxTxNxH, (BATCH, ACT_LENGTH, head_axis, HEAD_DIM))  # heads stay split

    q = proj("query", self.num_heads, HEADS)
    k = proj("key", self.num_kv_heads, KV_HEADS)
    v = proj("value", self.num_kv_heads, KV_HEADS)
    # A training step's positions are 0..T-1 (MaskSpec.arange_positions): a table instead of computed angles.
    arange = isinstance(mask_Bx1xTxS, attention.MaskSpec) and mask_Bx1xTxS.arange_positions and cache is None
    q = apply_rope(q, positions_BxT, self.rope_theta, self.rope_style, arange=arange)
    k = apply_rope(k, positions_BxT, self.rope_theta, self.rope_style, arange=arange)
    updated = None
    if hasattr(cache, "extend"):
      k, v, mask_Bx1xTxS, updated = cache.extend(k, v, positions_BxT)
    elif cache is not None:
      k, v = cache["update"](k, v)
    rng = None if deterministic or self.dropout_rate == 0.0 else self.make_rng("dropout")
    out = attention.attend(q, k, v, mask_Bx1xTxS, impl=self.attention_impl, dropout_rate=self.dropout_rate,
                           deterministic=deterministic, dropout_rng=rng, block_q=self.attention_block,
                           block_k=self.attention_block)
    std = self.init_std if self.out_init_std is None else self.out_init_std
    out = nn.DenseGeneral(
        d, axis=(-2, -1), use_bias=self.out_bias, dtype=self.dtype, name="out",
        kernel_init=_init(std, (HEADS, HEAD_DIM, EMBED)), bias_init=_zeros((EMBED,)))(out)
    return out if updated is None else (out, updated)


GLU_ACTIVATIONS = {
    "silu": nn.silu,
    "sigmoid": nn.sigmoid,  # HROM's "SwiGLU" and YingGem's "GeGLU" are really a * sigmoid(g)
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
}


class GatedMLP(nn.Module):
  """down(value(x) * act(gate(x))); value and gate share one [D, 2, F] kernel (index 0 value, 1 gate)."""
  hidden_dim: int
  activation: str = "silu"
  use_bias: bool = False
  init_std: float = 0.02
  out_init_std: Optional[float] = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD: Array) -> Array:
    if self.activation not in GLU_ACTIVATIONS:
      raise ValueError(f"model.glu must be one of {sorted(GLU_ACTIVATIONS)}, got {self.activation!r}")
    d = x_BxTxD.shape[-1]
    h_BxTx2xF = nn.DenseGeneral(
        (2, self.hidden_dim), use_bias=self.use_bias, dtype=self.dtype, name="wi",
        kernel_init=_init(self.init_std, (EMBED, None, MLP)), bias_init=_zeros((None, MLP)))(x_BxTxD)
    value, gate = h_BxTx2xF[..., 0, :], h_BxTx2xF[..., 1, :]
    h_BxTxF = value * GLU_ACTIVATIONS[self.activation](gate)
    std = self.init_std if self.out_init_std is None else self.out_init_std
    return nn.DenseGeneral(
        d, use_bias=self.use_bias, dtype=self.dtype, name="wo",
        kernel_init=_init(std, (MLP, EMBED)), bias_init=_zeros((EMBED,)))(h_BxTxF)
