"""One pre-norm decoder-only transformer; HROM, Optimus Prime and YingGem are configurations of it.

The compatibility flags (causal, attention_window, rope_style, glu, norm, biases) reproduce each original
exactly; configs/ documents which flags an original needs and which defaults jaxlm trains with instead.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import sharding
from jaxlm.models import attention, layers, layout, losses
from jaxlm.models.config_base import ModelConfigBase, register

Array = jax.Array

# What a rematerialised block saves for the backward pass (None: nothing, everything is recomputed).
REMAT_POLICIES = {
    "none": None, "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@register("decoder")
@dataclasses.dataclass(frozen=True)
class DecoderConfig(ModelConfigBase):
  vocab_size: int = 256
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 0            # 0 -> n_heads (plain multi-head attention)
  head_dim: int = 0              # 0 -> d_model // n_heads
  d_ff: int = 512
  norm: str = "rms"              # 'rms' | 'layer'
  norm_eps: float = 1e-6
  rope_style: str = "half"       # 'half' (NeoX rotate-half) | 'interleaved' (pairs 2i, 2i+1)
  rope_theta: float = 10000.0
  glu: str = "silu"              # gate activation: 'silu' | 'sigmoid' | 'gelu' | 'gelu_tanh'
  attn_bias: bool = False
  mlp_bias: bool = False
  head_bias: bool = False
  tie_embeddings: bool = False
  causal: bool = True            # False only to reproduce originals that attend to future tokens
  # Sliding window: 0 = full attention; an int applies to every layer; a tuple gives one value per layer.
  attention_window: Union[int, Sequence[int]] = 0
  dropout: float = 0.0           # residual dropout after attention and MLP
  attention_dropout: float = 0.0 # dropout on attention probabilities
  embed_init_std: float = 0.02
  init_std: float = 0.02
  out_init_std: float = 0.0      # 0 -> init_std; output projections (residual branch ends)
  head_init_std: float = 0.0     # 0 -> init_std
  max_seq_len: int = 1024        # longest context generation will build
  dtype: str = "float32"         # compute dtype; parameters stay float32
  remat: bool = False            # rematerialise each block in the backward pass (remat_policy 'full')
  remat_policy: str = "none"     # 'none' | 'full' | 'dots' | 'dots_no_batch': what a block keeps for backward
  attention_impl: str = "auto"   # 'auto' | 'xla' | 'chunked' | 'cudnn' | 'splash' (models/attention.py)
  attention_block: int = 512     # query/key block of the chunked attention
  xent_chunk: int = 0            # tokens per chunk of the training loss's logits; 0 = auto (about 128 MB)
  vocab_multiple: int = 1        # pad the vocabulary axes to a multiple of this inside the model (128 in the
                                 # full-size configs: even sharding, aligned matmuls); logits keep vocab_size
  scan_layers: bool = False      # the blocks as one nn.scan (params stacked under 'layers'; compile time flat
                                 # in depth); inference and converters unstack them (models/layout.py)
  scan_unroll: int = 1           # blocks per iteration of scan_layers' loop; >= n_layers: no loop at all, the
                                 # parameters still stacked (fewer, larger arrays for the optimizer and the jitted
                                 # call: faster on CPU, where a loop over the blocks is slow)

  def validate(self):
    super().validate()
    if self.n_heads <= 0 or (self.head_dim == 0 and self.d_model % self.n_heads):
      raise ValueError(f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}")
    if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
      raise ValueError(f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}")
    if self.resolved_head_dim % 2:
      raise ValueError(f"head dim {self.resolved_head_dim} must be even for rotary embeddings")
    if self.norm not in ("rms", "layer"):
      raise ValueError(f"model.norm must be 'rms' or 'layer', got {self.norm!r}")
    if self.rope_style not in ("half", "interleaved"):
      raise ValueError(f"model.rope_style must be 'half' or 'interleaved', got {self.rope_style!r}")
    if self.glu not in layers.GLU_ACTIVATIONS:
      raise ValueError(f"model.glu must be one of {sorted(layers.GLU_ACTIVATIONS)}, got {self.glu!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"model.remat_policy must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}")
    if self.attention_impl not in attention.IMPLEMENTATIONS:
      raise ValueError(f"model.attention_impl must be one of {attention.IMPLEMENTATIONS}, "
                       f"got {self.attention_impl!r}")
    if self.attention_block < 1 or self.xent_chunk < 0:
      raise ValueError(f"model.attention_block={self.attention_block} must be >= 1 and model.xent_chunk="
                       f"{self.xent_chunk} >= 0")
    windows = self.layer_windows
    if len(windows) != self.n_layers:
      raise ValueError(f"model.attention_window has {len(windows)} entries for {self.n_layers} layers")

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def layer_windows(self) -> tuple:
    w = self.attention_window
    return tuple(w) if isinstance(w, (tuple, list)) else (w,) * self.n_layers

  @property
  def padded_vocab(self) -> int:
    return layout.padded_vocab(self.vocab_size, self.vocab_multiple)

  @property
  def resolved_remat_policy(self) -> str:
    return "full" if self.remat and self.remat_policy == "none" else self.remat_policy

  @property
  def kv_cache_layout(self) -> tuple:
    """(kv heads, head dim, window) per layer: what jaxlm.kv_cache allocates (used only when causal)."""
    return tuple((self.kv_heads, self.resolved_head_dim, int(w or 0)) for w in self.layer_windows)


# The residual stream's logical axes: batch-sharded, replicated over a model-parallel axis (what Megatron-style
# tensor parallelism expects between blocks); mesh.rules may map the other two (e.g. sequence parallelism).
RESIDUAL = (layers.BATCH, layers.ACT_LENGTH, layers.ACT_EMBED)


def constrain_residual(x_BxTxD):
  return sharding.constrain(x_BxTxD, RESIDUAL)


class DecoderBlock(nn.Module):
  config: DecoderConfig
  window: int

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxS, deterministic: bool = True, cache=None):
    """mask_Bx1xTxS: an attention.MaskSpec (or a dense mask). cache: a kv_cache.Chunk for cached decoding;
    the block then returns (x, updated LayerKV)."""
    c = self.config
    dtype = jnp.dtype(c.dtype)
    out_std = c.out_init_std or c.init_std
    h = layers.make_norm(c.norm, c.norm_eps, dtype, "attn_norm")(x_BxTxD)
    h = layers.Attention(
        num_heads=c.n_heads, num_kv_heads=c.kv_heads, head_dim=c.resolved_head_dim, rope_theta=c.rope_theta,
        rope_style=c.rope_style, qkv_bias=c.attn_bias, out_bias=c.attn_bias, dropout_rate=c.attention_dropout,
        init_std=c.init_std, out_init_std=out_std, dtype=dtype, attention_impl=c.attention_impl,
        attention_block=c.attention_block, name="attn",
    )(h, positions_BxT, mask_Bx1xTxS, deterministic=deterministic, cache=cache)
    if cache is not None:
      h, cache = h
    x_BxTxD = x_BxTxD + nn.Dropout(c.dropout)(h, deterministic=deterministic)
    h = layers.make_norm(c.norm, c.norm_eps, dtype, "mlp_norm")(x_BxTxD)
    h = layers.GatedMLP(hidden_dim=c.d_ff, activation=c.glu, use_bias=c.mlp_bias, init_std=c.init_std,
                        out_init_std=out_std, dtype=dtype, name="mlp")(h)
    x_BxTxD = constrain_residual(x_BxTxD + nn.Dropout(c.dropout)(h, deterministic=deterministic))
    return x_BxTxD if cache is None else (x_BxTxD, cache)


def block_class(c: DecoderConfig):
  """DecoderBlock, rematerialised as model.remat / model.remat_policy say (scanned or not)."""
  policy = c.resolved_remat_policy
  if policy == "none":
    return DecoderBlock
  return nn.remat(DecoderBlock, static_argnums=(4,), policy=REMAT_POLICIES[policy])


class ScannedBlock(nn.Module):
  """One step of the scanned stack: (x, this layer's window) -> (x, None), under nn.scan in Decoder."""
  config: DecoderConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxTxD, window, positions_BxT, spec):
    c = self.config
    if spec.window is None and len(set(c.layer_windows)) > 1:
      spec = spec.replace(layer_window=window)  # windows that differ per layer are data of the scan
    return block_class(c)(c, 0, name="block")(x_BxTxD, positions_BxT, spec, self.deterministic), None


class HeadParams(nn.Module):
  """The output projection's arrays ('head/kernel' [D, V], 'head/bias' [V]), for the chunked loss to apply."""
  d_model: int
  vocab_size: int
  padded_vocab: int
  use_bias: bool
  init_std: float

  @nn.compact
  def __call__(self):
    kernel = self.param("kernel", layers._init_real_vocab(self.init_std, (layers.EMBED, layers.VOCAB),
                                                          self.vocab_size),
                        (self.d_model, self.padded_vocab), jnp.float32)
    bias = (self.param("bias", layers._zeros((layers.VOCAB,)), (self.padded_vocab,), jnp.float32)
            if self.use_bias else None)
    return kernel, bias


class Decoder(nn.Module):
  """tokens [B, T] -> float32 logits [B, T, V].

  Cached decoding (jaxlm.generate): pass `cache` (a list of kv_cache.LayerKV, one per layer, from
  kv_cache.init_cache) with the tokens' absolute `positions_BxT` and `padding_mask_BxT` (False = padding,
  not written to the cache); the call then returns (logits, updated cache). `logits_at_B` computes the head
  only at one query index per row (logits [B, 1, V]), e.g. a prompt's last real token. `return_hidden`
  returns (final-normed hidden states [B, T, D], project) instead, project(h) -> float32 logits being the head
  as a pure function (the training loss applies it a chunk at a time).
  """
  config: DecoderConfig

  @nn.compact
  def __call__(self, tokens_BxT: Array, *, padding_mask_BxT: Optional[Array] = None,
               positions_BxT: Optional[Array] = None, deterministic: bool = True,
               cache: Optional[Sequence[Any]] = None, logits_at_B: Optional[Array] = None,
               return_hidden: bool = False, segment_ids_BxT: Optional[Array] = None):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    b, t = tokens_BxT.shape
    if cache is not None:
      if c.scan_layers:
        raise ValueError("cached decoding runs on the unstacked layout: load the model through jaxlm.modeldir "
                         "(which unstacks scan_layers models) or models.layout.unstack_layers")
      if not c.causal:
        raise ValueError("a KV cache needs a causal model (model.causal=True); decode this one by full recompute")
      if positions_BxT is None:
        raise ValueError("cached decoding needs the tokens' absolute positions_BxT")
      if len(cache) != c.n_layers:
        raise ValueError(f"the cache has {len(cache)} layers, the model {c.n_layers}")
    arange_positions = positions_BxT is None
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    embed = nn.Embed(c.padded_vocab, c.d_model, dtype=dtype, name="embed",
                     embedding_init=layers._init_real_vocab(c.embed_init_std, (layers.VOCAB, layers.EMBED),
                                                            c.vocab_size))
    # The lookup reads a table gathered over FSDP's axis (still split over the vocabulary): left to the compiler,
    # a sharded table's gather moves every device's token ids and partial rows between all devices instead.
    table_VxD = sharding.constrain(embed.embedding, (layers.VOCAB, None))
    x_BxTxD = constrain_residual(jnp.take(table_VxD.astype(dtype), tokens_BxT, axis=0))
    if cache is not None:
      valid_BxT = jnp.ones((b, t), bool) if padding_mask_BxT is None else padding_mask_BxT.astype(bool)
      new_cache = []
      for i, window in enumerate(c.layer_windows):
        x_BxTxD, layer_cache = DecoderBlock(c, window, name=f"layers_{i}")(
            x_BxTxD, positions_BxT, None, deterministic, cache=cache[i].chunk(valid_BxT))
        new_cache.append(layer_cache)
    elif c.scan_layers:
      windows = c.layer_windows
      uniform = len(set(windows)) == 1
      spec = attention.MaskSpec(positions_BxT, positions_BxT, padding_mask_BxT, segment_ids_BxT, segment_ids_BxT,
                                causal=c.causal,
                                window=(windows[0] or None) if uniform else None, arange_positions=arange_positions)
      stack = nn.scan(ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(0, nn.broadcast, nn.broadcast), length=c.n_layers,
                      unroll=max(1, min(c.scan_unroll, c.n_layers)),
                      metadata_params={nn.PARTITION_NAME: layers.LAYERS})
      x_BxTxD, _ = stack(c, deterministic, name="layers")(x_BxTxD, jnp.asarray(windows, jnp.int32), positions_BxT,
                                                          spec)
    else:
      block_cls = block_class(c)
      for i, window in enumerate(c.layer_windows):
        # The mask is described by positions; each attention implementation builds what it needs from it.
        spec = attention.MaskSpec(positions_BxT, positions_BxT, padding_mask_BxT, segment_ids_BxT, segment_ids_BxT,
                                  causal=c.causal, window=window or None, arange_positions=arange_positions)
        x_BxTxD = block_cls(c, window, name=f"layers_{i}")(x_BxTxD, positions_BxT, spec, deterministic)
    if logits_at_B is not None:
      x_BxTxD = jnp.take_along_axis(x_BxTxD, logits_at_B.astype(jnp.int32)[:, None, None], axis=1)
    x_BxTxD = layers.make_norm(c.norm, c.norm_eps, dtype, "final_norm")(x_BxTxD)
    project = self._head(embed, dtype)
    if return_hidden:
      return x_BxTxD, project
    logits = project(x_BxTxD)[..., :c.vocab_size]  # the padded ids are not part of the model's vocabulary
    return logits if cache is None else (logits, new_cache)

  def _head(self, embed: nn.Embed, dtype):
    """The output projection as a pure function of its arrays: hidden [..., D] -> float32 logits [..., V]."""
    c = self.config
    if c.tie_embeddings:
      table_VxD = embed.embedding
      bias_V = (self.param("head_bias", layers._zeros((layers.VOCAB,)), (c.padded_vocab,), jnp.float32)
                if c.head_bias else None)
      matmul = lambda h: jnp.einsum("...d,vd->...v", h.astype(dtype), table_VxD.astype(dtype))
    else:
      kernel_DxV, bias_V = HeadParams(c.d_model, c.vocab_size, c.padded_vocab, c.head_bias,
                                      c.head_init_std or c.init_std, name="head")()
      matmul = lambda h: jnp.einsum("...d,dv->...v", h.astype(dtype), kernel_DxV.astype(dtype))

    def project(h):
      logits = matmul(h)
      if bias_V is not None:
        logits = logits + bias_V.astype(logits.dtype)
      logits = sharding.constrain(logits.astype(jnp.float32), RESIDUAL[:-1] + (layers.VOCAB,))
      return layers.mask_padding_ids(logits, c.vocab_size)

    return project

  def loss(self, batch, deterministic: bool = True):
    """Next-token cross-entropy: (sum, weight sum, {'xent': sum}); the logits are made a chunk at a time."""
    # Packed documents (data.packing='documents') attend only within their own document.
    hidden_BxTxD, project = self(batch["inputs"], deterministic=deterministic, return_hidden=True,
                                 segment_ids_BxT=batch.get("segment_ids"))
    xent, weight = losses.chunked_xent(hidden_BxTxD, project, batch["targets"], batch["weights"],
                                       chunk=self.config.xent_chunk)
    return xent, weight, {"xent": xent}
