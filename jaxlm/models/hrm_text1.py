"""HRM-Text1 (julianjjo/HRM_Models, class HRMText1 of hrm_training_small_100m.py): stacked (H, L) block pairs
with a pondering halt head per pair, tied output head.

Forward (SPEC.md, shared/reference/hrm_text1): z_L = embed(tokens), z_H = 0. Every layer l ponders up to
M = halt_max_steps steps: at step s it reads p = clip(halt_l(z_H), eps, 1 - eps), adds rem * p * z_H (rem * z_H
at the last step) to a running `total`, multiplies rem by (1 - p) and, unless it is the last step, applies its
block pair once: z_L = L(z_L + z_H); z_H = H(z_H + z_L). rem restarts at 1 for every layer, `total` and the
states carry on. A layer stops early when rem < eps at every position (the original's `torch.all`); the
remaining mass is then dropped. logits = embed^T final_norm(total).

Both loops are scans: over layers (stacked per-layer parameters, nn.scan) and over pondering steps (the
layer's parameters broadcast), so compile time does not grow with n_layers x halt_max_steps. The early exit is
a mask: after it, steps still run but change nothing (and pass no gradient), exactly as if the loop had stopped;
the exit is global over the (micro)batch as in the original, so it rarely saves compute. Gradients flow through
every step (the original uses full backprop, no one-step approximation).

Compatibility flags (configs/hrm_text1.py says which variant sets what):
  ponder_loss        'expected' (jaxlm): the expected number of block-pair updates under the halting
                     distribution, sum_l sum_{s>=1} rem_s per token, differentiable, so the halt heads learn to
                     trade steps for loss. 'count' (original): the number of updates executed, a constant
                     with zero gradient. The two agree when no head halts (every rem_s = 1).
  exit_over_padding  False (jaxlm): padding positions do not hold up the global early exit. True (original):
                     `all(rem < eps)` runs over every position, padding included.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models import layers, layout, losses
from jaxlm.models.config_base import ModelConfigBase, register

Array = jax.Array
PONDER_LOSSES = ("expected", "count")


@register("hrm_text1")
@dataclasses.dataclass(frozen=True)
class HRMText1Config(ModelConfigBase):
  vocab_size: int = 32100
  d_model: int = 512              # original n_embd
  n_heads: int = 8                # original n_head
  n_layers: int = 12              # (H, L) block pairs, each with its own halt head
  d_ff: int = 2048
  max_seq_len: int = 2048         # original block_size (RoPE has no table limit; generation context)
  rope_theta: float = 10000.0     # original rotary_embedding_base
  norm_eps: float = 1e-6
  halt_max_steps: int = 8         # M: halt reads per layer; the block pair runs M - 1 times
  halt_bias_init: float = -2.2
  halt_eps: float = 1e-6          # clip of p and the early-exit threshold
  ponder_loss_weight: float = 0.01
  ponder_loss: str = "expected"   # 'expected' (differentiable) | 'count' (original: constant)
  exit_over_padding: bool = False # True: original global exit that also waits for padding positions
  dropout: float = 0.1            # residual dropout after attention and after the MLP
  attention_dropout: float = 0.1  # on attention probabilities
  mlp_dropout: float = 0.1        # the MLP's own dropout (the original applies dropout twice on that path)
  embed_init_std: float = 1.0     # torch nn.Embedding default N(0, 1)
  init_std: float = 0.0           # 0: normal with torch Linear's default variance 1 / (3 fan_in)
  dtype: str = "float32"          # compute dtype; parameters stay float32
  remat: bool = False             # rematerialise each block in the backward pass (original: True)
  xent_chunk: int = 0             # tokens per chunk of the training loss's logits; 0 = auto (about 128 MB)
  vocab_multiple: int = 1         # pad the vocabulary axis to a multiple of this inside the model (see layout.py)

  @property
  def padded_vocab(self) -> int:
    return layout.padded_vocab(self.vocab_size, self.vocab_multiple)

  def validate(self):
    super().validate()
    if self.xent_chunk < 0 or self.vocab_multiple < 1:
      raise ValueError(f"model.xent_chunk={self.xent_chunk} must be >= 0 and model.vocab_multiple="
                       f"{self.vocab_multiple} >= 1")
    if self.n_heads <= 0 or self.d_model % self.n_heads:
      raise ValueError(f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}")
    if self.resolved_head_dim % 2:
      raise ValueError(f"head dim {self.resolved_head_dim} (model.d_model / model.n_heads) must be even for RoPE")
    if self.halt_max_steps < 2:
      raise ValueError(f"model.halt_max_steps must be >= 2 (the block pairs run halt_max_steps - 1 times), "
                       f"got {self.halt_max_steps}")
    if self.ponder_loss not in PONDER_LOSSES:
      raise ValueError(f"model.ponder_loss must be one of {PONDER_LOSSES}, got {self.ponder_loss!r}")
    if not 0.0 < self.halt_eps < 0.5:
      raise ValueError(f"model.halt_eps must be in (0, 0.5), got {self.halt_eps}")
    for name in ("dropout", "attention_dropout", "mlp_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")

  # The names convert/ and the decoder tools use for plain multi-head attention.
  @property
  def kv_heads(self) -> int:
    return self.n_heads

  @property
  def resolved_head_dim(self) -> int:
    return self.d_model // self.n_heads

  def linear_std(self, fan_in: int) -> float:
    """init_std, or the standard deviation of torch's kaiming-uniform default U(+-1/sqrt(fan_in))."""
    return self.init_std or (3.0 * fan_in) ** -0.5


class HRMBlock(nn.Module):
  """Pre-norm block: x + drop(attn(norm1 x)); x + drop(mlp_drop(w3(silu(w1 h) * w2 h))), h = norm2 x."""
  config: HRMText1Config
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxTxD: Array, positions_BxT: Array, mask_Bx1xTxS: Array) -> Array:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    # layers.RMSNorm computes in float32: identical to the original's no-upcast norm in float32.
    h = layers.RMSNorm(eps=c.norm_eps, dtype=dtype, name="norm1")(x_BxTxD)
    h = layers.Attention(
        num_heads=c.n_heads, num_kv_heads=c.n_heads, head_dim=c.resolved_head_dim, rope_theta=c.rope_theta,
        rope_style="half", dropout_rate=c.attention_dropout, init_std=c.linear_std(c.d_model), dtype=dtype,
        name="attn")(h, positions_BxT, mask_Bx1xTxS, deterministic=self.deterministic)
    x_BxTxD = x_BxTxD + nn.Dropout(c.dropout)(h, deterministic=self.deterministic)
    h = layers.RMSNorm(eps=c.norm_eps, dtype=dtype, name="norm2")(x_BxTxD)
    # GatedMLP is value * silu(gate): the original's w2 is the value, w1 the gate, w3 the output.
    h = layers.GatedMLP(hidden_dim=c.d_ff, activation="silu", init_std=c.linear_std(c.d_model),
                        out_init_std=c.linear_std(c.d_ff), dtype=dtype, name="mlp")(h)
    h = nn.Dropout(c.mlp_dropout)(h, deterministic=self.deterministic)
    return x_BxTxD + nn.Dropout(c.dropout)(h, deterministic=self.deterministic)


class HRMLayer(nn.Module):
  """One (H, L) block pair with its halt head; __call__ runs the layer's whole pondering loop."""
  config: HRMText1Config
  deterministic: bool = True

  def setup(self):
    c = self.config
    block = nn.remat(HRMBlock) if c.remat else HRMBlock
    self.H_module = block(c, self.deterministic)  # created first, as in the original
    self.L_module = block(c, self.deterministic)
    self.halt_head = nn.Dense(
        1, dtype=jnp.float32, name="halt_head",
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(c.linear_std(c.d_model)),
                                                 (layers.EMBED, None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.constant(c.halt_bias_init), (None,)))

  def inner(self, zH_BxTxD, zL_BxTxD, positions_BxT, mask_Bx1xTxS):
    """The original HRMInner: L reads z_L + z_H, then H reads z_H + the new z_L."""
    zL_BxTxD = self.L_module(zL_BxTxD + zH_BxTxD, positions_BxT, mask_Bx1xTxS)
    zH_BxTxD = self.H_module(zH_BxTxD + zL_BxTxD, positions_BxT, mask_Bx1xTxS)
    return zH_BxTxD, zL_BxTxD

  def halt_prob(self, zH_BxTxD):
    """sigmoid(Linear(z_H)) per token, float32, before the clip (what the original's halt head returns)."""
    return jax.nn.sigmoid(self.halt_head(zH_BxTxD.astype(jnp.float32))[..., 0])

  def _step(self, state, positions_BxT, mask_Bx1xTxS, valid_BxT):
    """One non-final pondering step; an inactive state (after the early exit) passes through unchanged."""
    c = self.config
    zH, zL, total, rem, active, n_updates, expected = state
    p_raw = self.halt_prob(zH)
    p = jnp.clip(p_raw, c.halt_eps, 1.0 - c.halt_eps)
    total = total + jnp.where(active, rem * p, 0.0)[..., None] * zH.astype(jnp.float32)
    rem_next = rem * (1.0 - p)
    halted = jnp.all((rem_next < c.halt_eps) | ~valid_BxT)  # the original's global torch.all
    rem = jnp.where(active, rem_next, rem)
    expected = expected + jnp.where(active, rem_next, 0.0)
    n_updates = n_updates + active.astype(jnp.int32)
    go = active & ~halted
    zH_new, zL_new = self.inner(zH, zL, positions_BxT, mask_Bx1xTxS)
    zH, zL = jnp.where(go, zH_new, zH), jnp.where(go, zL_new, zL)
    return (zH, zL, total, rem, go, n_updates, expected), jnp.where(active, p_raw, 0.0)

  def __call__(self, carry, positions_BxT, mask_Bx1xTxS, valid_BxT):
    """carry (z_H, z_L, total) -> carry, (halt probs [M, B, T], updates run, expected updates [B, T])."""
    c = self.config
    zH, zL, total = carry
    b, t = zH.shape[:2]
    state = (zH, zL, total, jnp.ones((b, t), jnp.float32), jnp.array(True), jnp.int32(0),
             jnp.zeros((b, t), jnp.float32))
    steps = nn.scan(lambda mdl, s, *args: mdl._step(s, *args), variable_broadcast="params",
                    split_rngs={"params": False, "dropout": True}, in_axes=(nn.broadcast,) * 3,
                    length=c.halt_max_steps - 1)
    state, probs_SxBxT = steps(self, state, positions_BxT, mask_Bx1xTxS, valid_BxT)
    zH, zL, total, rem, active, n_updates, expected = state
    p_last = self.halt_prob(zH)  # the last step weighs by 1, but the original still evaluates its head
    total = total + jnp.where(active, rem, 0.0)[..., None] * zH.astype(jnp.float32)
    probs = jnp.concatenate([probs_SxBxT, jnp.where(active, p_last, 0.0)[None]], axis=0)
    return (zH, zL, total), (probs, n_updates, expected)


class HRMText1(nn.Module):
  """tokens [B, T] -> float32 logits [B, T, V], always pondering (train and eval alike, as the original)."""
  config: HRMText1Config

  @nn.compact
  def ponder(self, tokens_BxT: Array, *, padding_mask_BxT: Optional[Array] = None,
             positions_BxT: Optional[Array] = None, deterministic: bool = True,
             return_hidden: bool = False, segment_ids_BxT: Optional[Array] = None) -> Dict[str, Array]:
    """Logits plus the pondering record: halt_probs [n_layers, M, B, T] (0 for steps after an early exit),
    n_updates [n_layers] (block-pair updates run), expected_updates [B, T] (the differentiable ponder cost).
    return_hidden: "hidden" (final-normed [B, T, D]) and "project" (hidden -> float32 logits over the padded
    vocabulary, padding ids masked) instead of "logits", for the chunked loss. segment_ids_BxT: packed documents
    (data.packing='documents') attend only within their own."""
    c = self.config
    dtype = jnp.dtype(c.dtype)
    b, t = tokens_BxT.shape
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    embed = nn.Embed(c.padded_vocab, c.d_model, dtype=dtype, name="embed",
                     embedding_init=layers._init_real_vocab(c.embed_init_std, (layers.VOCAB, layers.EMBED),
                                                            c.vocab_size))
    zL = embed(tokens_BxT)
    mask = layers.attention_mask(positions_BxT, positions_BxT, causal=True, window=None,
                                 k_valid_BxS=padding_mask_BxT, q_segment_BxT=segment_ids_BxT,
                                 k_segment_BxS=segment_ids_BxT)
    if padding_mask_BxT is None or c.exit_over_padding:
      valid = jnp.ones((b, t), bool)
    else:
      valid = padding_mask_BxT.astype(bool)
    stack = nn.scan(HRMLayer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast,) * 3, length=c.n_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    carry = (jnp.zeros_like(zL), zL, jnp.zeros((b, t, c.d_model), jnp.float32))
    (_, _, total), (probs, n_updates, expected) = stack(c, deterministic, name="layers")(
        carry, positions_BxT, mask, valid)
    x = layers.RMSNorm(eps=c.norm_eps, dtype=dtype, name="final_norm")(total.astype(dtype))
    record = {"halt_probs": probs, "n_updates": n_updates, "expected_updates": jnp.sum(expected, axis=0)}

    table_VxD = embed.embedding  # an array, not the module: `project` runs inside the chunked loss's scan

    def project(h):  # tied head: the original's lm_head is the embedding
      logits = jnp.einsum("...d,vd->...v", h.astype(dtype), table_VxD.astype(dtype)).astype(jnp.float32)
      return layers.mask_padding_ids(logits, c.vocab_size)

    if return_hidden:
      return {"hidden": x, "project": project, **record}
    return {"logits": project(x)[..., :c.vocab_size], **record}

  def __call__(self, tokens_BxT: Array, *, padding_mask_BxT: Optional[Array] = None,
               positions_BxT: Optional[Array] = None, deterministic: bool = True,
               segment_ids_BxT: Optional[Array] = None) -> Array:
    return self.ponder(tokens_BxT, padding_mask_BxT=padding_mask_BxT, positions_BxT=positions_BxT,
                       deterministic=deterministic, segment_ids_BxT=segment_ids_BxT)["logits"]

  def halt_probs(self, tokens_BxT: Array, *, padding_mask_BxT: Optional[Array] = None) -> Array:
    """Halt head outputs [n_layers, halt_max_steps, B, T] (sigmoid, before the clip)."""
    return self.ponder(tokens_BxT, padding_mask_BxT=padding_mask_BxT)["halt_probs"]

  def loss(self, batch: Dict[str, Array], deterministic: bool = True):
    """(xent + ponder_loss_weight * ponder, weight, {'xent', 'ponder'}) as weighted sums over tokens.

    Padding is masked through batch['weights'] (and, if the batch has one, batch['padding_mask'] masks padded
    keys and keeps them out of the early exit; causal attention makes right padding harmless without it).
    """
    c = self.config
    out = self.ponder(batch["inputs"], padding_mask_BxT=batch.get("padding_mask"), deterministic=deterministic,
                      return_hidden=True, segment_ids_BxT=batch.get("segment_ids"))
    xent, weight = losses.chunked_xent(out["hidden"], out["project"], batch["targets"], batch["weights"],
                                       chunk=c.xent_chunk)
    if c.ponder_loss == "count":
      per_token = jax.lax.stop_gradient(jnp.sum(out["n_updates"]).astype(jnp.float32))
    else:
      per_token = out["expected_updates"]
    ponder = jnp.sum(per_token * batch["weights"].astype(jnp.float32))
    return xent + c.ponder_loss_weight * ponder, weight, {"xent": xent, "ponder": ponder}
