"""HRM: the char-level Hierarchical Reasoning Model (EduardTalianu/HRM-_txt, from sapientinc/HRM).

Two recurrent transformer stacks share one hidden width: the fast L module runs T steps per cycle, the slow
H module one step per cycle, for N cycles (one "segment" of N*T L-updates and N H-updates):

  z_L <- L(z_L + z_H + x)      every step          (x: token embeddings * sqrt(D))
  z_H <- H(z_H + z_L)          after every T-th step
  logits = head(z_H)           q = q_head(z_H) -> (q_halt, q_continue)

ACT runs segments, each continuing from the last one's state, until the Q-head says halt (q_halt > q_continue)
or halt_max_steps segments ran. Inference (`__call__`) is a `lax.while_loop` over segments in which halted
examples (or positions, with q_head_pool='token') keep their state. The N x T recurrence is nested loops
(`while_loop`s of run-time trip count without gradient, `scan`s where 'full' backpropagation needs them), so
the program, and its compile time, is the same for every N and T.

Training (`loss`) is one segment from the initial state (train_mode='single', what the original trainer does)
or deep supervision over halt_max_steps segments with halting (train_mode='act', upstream HRM), optionally with
the Q-learning halting loss. grad_mode='one_step' is upstream's 1-step gradient (all but the final L and H
update without gradient); 'full' backpropagates through every step of the segment. The state is detached
between segments (upstream) and reset to the initial state for every batch (the original carried it across
batches; jaxlm does not).

Compatibility flags reproduce the original text model: causal=False (it attends to future tokens),
norm_position='post', q_head_pool='mean', mlp_rounding='int', act_batch_halt=True.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxlm.models import layers
from jaxlm.models.config_base import ModelConfigBase, register

Array = jax.Array

# Chat reasoning modes of the original (hrm_chat.py): name -> (N cycles, T steps per cycle).
REASONING_MODES = {"fast": (1, 1), "normal": (2, 2), "deep": (3, 2), "thorough": (4, 3), "extreme": (6, 4)}

_CHOICES = {
    "norm_position": ("pre", "post"),
    "q_head_pool": ("token", "mean", "first"),
    "mlp_rounding": ("round", "int"),
    "init_state": ("fixed", "learned"),
    "grad_mode": ("one_step", "full"),
    "train_mode": ("single", "act"),
    "loss_fn": ("softmax", "stablemax"),
}


@register("hrm")
@dataclasses.dataclass(frozen=True)
class HRMConfig(ModelConfigBase):
  vocab_size: int = 100
  d_model: int = 256
  n_heads: int = 8
  l_layers: int = 3
  h_layers: int = 3
  expansion: float = 2.5          # MLP width = ceil_to(mlp_multiple, rounding(expansion * d_model * 2/3))
  mlp_rounding: str = "round"     # 'round' (upstream HRM) | 'int' (the text original truncates)
  mlp_multiple: int = 256
  n_cycles: int = 2               # N: H updates per segment
  t_steps: int = 2                # T: L updates per H update
  halt_max_steps: int = 8         # ACT segments at most
  halt_exploration_prob: float = 0.1
  causal: bool = True             # False only to reproduce the original's bidirectional attention
  norm_position: str = "pre"      # 'pre' (+ a final norm per module) | 'post' (the original and upstream)
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  q_head_pool: str = "token"      # 'token': a Q-head per position, halting per position (causal);
                                  # 'mean': sequence mean (the original); 'first': token 0 (upstream)
  act_batch_halt: bool = False    # True: the whole batch halts only when every row wants to (the original)
  init_state: str = "fixed"       # 'fixed': random initial z_L/z_H never trained (buffers) | 'learned'
  grad_mode: str = "one_step"     # 'one_step' (upstream 1-step gradient) | 'full' (backprop through all steps)
  train_mode: str = "single"      # 'single': one segment from z0 (the original trainer) | 'act': deep supervision
  q_learning: bool = False        # add upstream's Q-learning halting loss (train_mode 'act')
  loss_fn: str = "softmax"        # 'softmax' (the original trainer) | 'stablemax' (upstream HRM)
  max_seq_len: int = 64           # context generation builds (the original chat keeps the last 64 ids)
  dtype: str = "float32"          # compute dtype; parameters stay float32

  def validate(self):
    super().validate()
    for name, allowed in _CHOICES.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f"model.{name} must be one of {allowed}, got {getattr(self, name)!r}")
    if self.n_heads <= 0 or self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
      raise ValueError(f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model} into even head dims")
    for name in ("n_cycles", "t_steps", "halt_max_steps", "l_layers", "h_layers", "mlp_multiple"):
      if getattr(self, name) < 1:
        raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
    if self.q_learning and self.train_mode != "act":
      raise ValueError("model.q_learning needs model.train_mode='act' (the Q-head learns over ACT segments)")
    if not 0.0 <= self.halt_exploration_prob <= 1.0:
      raise ValueError(f"model.halt_exploration_prob must be in [0, 1], got {self.halt_exploration_prob}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  # convert.api resolves these for every family it exports (n_kv_heads/head_dim of decoder configs).
  @property
  def kv_heads(self) -> int:
    return self.n_heads

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim

  @property
  def d_ff(self) -> int:
    width = self.expansion * self.d_model * 2 / 3
    width = int(width) if self.mlp_rounding == "int" else round(width)
    return -(-width // self.mlp_multiple) * self.mlp_multiple


def apply_reasoning_mode(config, mode: Optional[str] = None, n_cycles: Optional[int] = None,
                         t_steps: Optional[int] = None):
  """The config (HRMConfig or a model dict) with N and T from a named mode, explicit values winning."""
  changes = {}
  if mode is not None:
    if mode not in REASONING_MODES:
      raise ValueError(f"unknown reasoning mode {mode!r}; choose one of {sorted(REASONING_MODES)}")
    changes["n_cycles"], changes["t_steps"] = REASONING_MODES[mode]
  for name, value in (("n_cycles", n_cycles), ("t_steps", t_steps)):
    if value is not None:
      if int(value) < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
      changes[name] = int(value)
  if isinstance(config, Mapping):
    return {**config, **changes}
  return config.replace(**changes)


# ----------------------------------------------------------------------------------------------- blocks
class HRMBlock(nn.Module):
  """Attention + SwiGLU with post-norm (x = norm(x + f(x)), the original) or pre-norm (x = x + f(norm(x)))."""
  config: HRMConfig

  @nn.compact
  def __call__(self, x_BxTxD: Array, positions_BxT: Array, mask_Bx1xTxS: Array) -> Array:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    std = 1.0 / math.sqrt(c.d_model)
    attn = layers.Attention(num_heads=c.n_heads, num_kv_heads=c.n_heads, head_dim=c.head_dim,
                            rope_theta=c.rope_theta, rope_style="half", init_std=std, dtype=dtype, name="attn")
    mlp = layers.GatedMLP(hidden_dim=c.d_ff, activation="silu", init_std=std,
                          out_init_std=1.0 / math.sqrt(c.d_ff), dtype=dtype, name="mlp")
    attn_norm = layers.RMSNorm(eps=c.norm_eps, dtype=dtype, name="attn_norm")
    mlp_norm = layers.RMSNorm(eps=c.norm_eps, dtype=dtype, name="mlp_norm")
    if c.norm_position == "post":
      x_BxTxD = attn_norm(x_BxTxD + attn(x_BxTxD, positions_BxT, mask_Bx1xTxS))
      return mlp_norm(x_BxTxD + mlp(x_BxTxD))
    x_BxTxD = x_BxTxD + attn(attn_norm(x_BxTxD), positions_BxT, mask_Bx1xTxS)
    return x_BxTxD + mlp(mlp_norm(x_BxTxD))


class ReasoningModule(nn.Module):
  """A stack of blocks applied to (state + injection). Pre-norm stacks end with a norm, which keeps the
  recurrent state at unit scale across steps as post-norm does."""
  config: HRMConfig
  n_layers: int

  @nn.compact
  def __call__(self, x_BxTxD: Array, positions_BxT: Array, mask_Bx1xTxS: Array) -> Array:
    for i in range(self.n_layers):
      x_BxTxD = HRMBlock(self.config, name=f"layers_{i}")(x_BxTxD, positions_BxT, mask_Bx1xTxS)
    if self.config.norm_position == "pre":
      x_BxTxD = layers.RMSNorm(eps=self.config.norm_eps, dtype=jnp.dtype(self.config.dtype), name="final_norm")(x_BxTxD)
    return x_BxTxD


class Context(NamedTuple):
  """What every step of a segment reads: token embeddings, positions, attention mask, valid positions."""
  x_BxTxD: Array
  positions_BxT: Array
  mask_Bx1xTxS: Array
  valid_BxT: Array


def _trunc_normal(stddev: float, names: tuple):
  return nn.with_logical_partitioning(nn.initializers.truncated_normal(stddev), names)


def _lm_losses(logits_BxTxV: Array, targets_BxT: Array, loss_fn: str) -> Array:
  """Per-token cross-entropy [B, T] under softmax or upstream HRM's stablemax."""
  logits = logits_BxTxV.astype(jnp.float32)
  if loss_fn == "softmax":
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets_BxT)
  # stablemax: s(x) = x + 1 for x >= 0, 1 / (1 - x) below; log p = log s(target) - log sum s (float32 here,
  # upstream float64).
  s = jnp.where(logits < 0, 1.0 / (1.0 - logits + 1e-30), logits + 1.0)
  s_target = jnp.take_along_axis(s, targets_BxT[..., None], axis=-1)[..., 0]
  return jnp.log(jnp.sum(s, axis=-1)) - jnp.log(s_target)


# ----------------------------------------------------------------------------------------------- model
class HRM(nn.Module):
  """tokens [B, T] -> float32 logits [B, T, V] through ACT inference (see the module docstring)."""
  config: HRMConfig

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    self.embed = nn.Embed(c.vocab_size, c.d_model, dtype=dtype, name="embed",
                          embedding_init=_trunc_normal(1.0 / math.sqrt(c.d_model), (layers.VOCAB, layers.EMBED)))
    self.L_module = ReasoningModule(c, c.l_layers, name="L_module")
    self.H_module = ReasoningModule(c, c.h_layers, name="H_module")
    self.head = nn.DenseGeneral(c.vocab_size, use_bias=False, dtype=dtype, name="head",
                                kernel_init=_trunc_normal(1.0 / math.sqrt(c.d_model), (layers.EMBED, layers.VOCAB)))
    # Q-head starts at weight 0, bias -5 (upstream): q_halt == q_continue, so ACT runs every segment.
    self.q_head = nn.DenseGeneral(
        2, use_bias=True, dtype=jnp.float32, name="q_head",
        kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (layers.EMBED, None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.constant(-5.0), (None,)))
    self.init_L = self.param("init_L", _trunc_normal(1.0, (layers.EMBED,)), (c.d_model,), jnp.float32)
    self.init_H = self.param("init_H", _trunc_normal(1.0, (layers.EMBED,)), (c.d_model,), jnp.float32)

  # ------------------------------------------------------------------------------------- pieces
  def context(self, tokens_BxT: Array, padding_mask_BxT: Optional[Array] = None,
              positions_BxT: Optional[Array] = None, segment_ids_BxT: Optional[Array] = None) -> Context:
    """segment_ids_BxT: packed documents (data.packing='documents') attend only within their own."""
    c = self.config
    b, t = tokens_BxT.shape
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid_BxT = jnp.ones((b, t), bool) if padding_mask_BxT is None else padding_mask_BxT.astype(bool)
    mask = layers.attention_mask(positions_BxT, positions_BxT, causal=c.causal, window=None,
                                 k_valid_BxS=padding_mask_BxT, q_segment_BxT=segment_ids_BxT,
                                 k_segment_BxS=segment_ids_BxT)
    x_BxTxD = self.embed(tokens_BxT) * jnp.asarray(math.sqrt(c.d_model), jnp.dtype(c.dtype))
    return Context(x_BxTxD, positions_BxT, mask, valid_BxT)

  def initial_state(self, batch: int, length: int):
    """(z_L, z_H) at the start of every forward: the init vectors broadcast to every position."""
    init_L, init_H = self.init_L, self.init_H
    if self.config.init_state == "fixed":  # buffers in the original: never trained
      init_L, init_H = jax.lax.stop_gradient(init_L), jax.lax.stop_gradient(init_H)
    dtype = jnp.dtype(self.config.dtype)
    shape = (batch, length, self.config.d_model)
    return jnp.broadcast_to(init_L.astype(dtype), shape), jnp.broadcast_to(init_H.astype(dtype), shape)

  def l_step(self, z_L: Array, z_H: Array, ctx: Context) -> Array:
    return self.L_module(z_L + z_H + ctx.x_BxTxD, ctx.positions_BxT, ctx.mask_Bx1xTxS)

  def h_step(self, z_H: Array, z_L: Array, ctx: Context) -> Array:
    return self.H_module(z_H + z_L, ctx.positions_BxT, ctx.mask_Bx1xTxS)

  def outputs(self, z_H: Array, valid_BxT: Array):
    """(float32 logits [B, T, V], q logits [B, T, 2] for q_head_pool 'token' else [B, 2])."""
    return self.logits(z_H), self.q_logits(z_H, valid_BxT)

  def logits(self, z_H: Array) -> Array:
    return self.head(z_H).astype(jnp.float32)

  def q_logits(self, z_H: Array, valid_BxT: Array) -> Array:
    """(q_halt, q_continue) per position ('token'), of the mean over real positions ('mean'), or of token 0."""
    z = z_H.astype(jnp.float32)
    if self.config.q_head_pool == "mean":  # real positions only: padding must not change the decision
      w = valid_BxT.astype(jnp.float32)[..., None]
      z = jnp.sum(z * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    elif self.config.q_head_pool == "first":
      z = z[:, 0]
    return self.q_head(z)

  # ------------------------------------------------------------------------------------- recurrence
  # Two implementations of one schedule (for i < N*T: z_L <- L; after every T-th: z_H <- H):
  #  * differentiable (grad_mode 'full' in training): nested scans of static lengths N and T;
  #  * without gradient (inference, and everything but the last L and H update under 'one_step'): nested
  #    while loops whose trip counts XLA cannot see, so the compiled program is the same for every N and T
  #    (a loop of known trip count 0 or 1 would be removed, making small modes compile faster than large).
  def _scan_l(self, z_L, z_H, ctx, length: int):
    def body(mdl, z, _):
      return mdl.l_step(z, z_H, ctx), None
    z_L, _ = nn.scan(body, variable_broadcast="params", split_rngs={"params": False}, length=length)(self, z_L, None)
    return z_L

  def _scan_cycles(self, z_L, z_H, ctx, n: int, t: int):
    def body(mdl, carry, _):
      z_l, z_h = carry
      z_l = mdl._scan_l(z_l, z_h, ctx, t)
      return (z_l, mdl.h_step(z_h, z_l, ctx)), None
    (z_L, z_H), _ = nn.scan(body, variable_broadcast="params", split_rngs={"params": False},
                            length=n)(self, (z_L, z_H), None)
    return z_L, z_H

  def _loop_l(self, z_L, z_H, ctx, count: Array):
    def body(mdl, carry):
      i, z = carry
      return i + 1, mdl.l_step(z, z_H, ctx)
    return nn.while_loop(lambda mdl, c: c[0] < count, body, self, (jnp.int32(0), z_L))[1]

  def _loop_cycles(self, z_L, z_H, ctx, count: Array, t: Array):
    def body(mdl, carry):
      i, z_l, z_h = carry
      z_l = mdl._loop_l(z_l, z_h, ctx, t)
      return i + 1, z_l, mdl.h_step(z_h, z_l, ctx)
    _, z_L, z_H = nn.while_loop(lambda mdl, c: c[0] < count, body, self, (jnp.int32(0), z_L, z_H))
    return z_L, z_H

  def segment(self, z_L: Array, z_H: Array, ctx: Context, *, grad_mode: Optional[str] = None,
              n_cycles: Optional[int] = None, t_steps: Optional[int] = None):
    """One segment from (z_L, z_H): N*T L updates and N H updates. grad_mode (default the config's):
    'one_step' leaves only the final L and H update differentiable, 'full' all of them."""
    c = self.config
    n, t = n_cycles or c.n_cycles, t_steps or c.t_steps
    if (grad_mode or c.grad_mode) == "full":
      return self._scan_cycles(z_L, z_H, ctx, n, t)
    # The barrier hides the trip counts from XLA's loop simplification.
    n_dyn, t_dyn = jax.lax.optimization_barrier((jnp.int32(n), jnp.int32(t)))
    z_L, z_H = self._loop_cycles(z_L, z_H, ctx, n_dyn - 1, t_dyn)
    z_L = self._loop_l(z_L, z_H, ctx, t_dyn - 1)
    z_L, z_H = jax.lax.stop_gradient(z_L), jax.lax.stop_gradient(z_H)
    z_L = self.l_step(z_L, z_H, ctx)
    return z_L, self.h_step(z_H, z_L, ctx)

  def _halt_shape(self, b: int, t: int) -> tuple:
    return (b, t) if self.config.q_head_pool == "token" else (b,)

  def _halt_now(self, q, steps, max_steps, halted):
    """Halt where q_halt > q_continue or the step limit is reached (with act_batch_halt: everywhere, once
    every example not yet halted wants to)."""
    want = q[..., 0] > q[..., 1]
    if self.config.act_batch_halt:
      want = jnp.broadcast_to(jnp.all(want | halted), want.shape)
    return want | (steps >= max_steps)

  def _touch(self, ctx: Context) -> dict:
    """Creates every parameter with one L and H update outside any loop (lifted loops cannot create
    parameters); `init` stops there, so it neither traces nor runs the ACT loop."""
    z_L, z_H = self.initial_state(*ctx.x_BxTxD.shape[:2])
    z_L = self.l_step(z_L, z_H, ctx)
    z_H = self.h_step(z_H, z_L, ctx)
    logits, q = self.outputs(z_H, ctx.valid_BxT)
    return {"logits": logits, "q_logits": q, "steps": jnp.ones(q.shape[:-1], jnp.int32), "z_L": z_L, "z_H": z_H}

  # ------------------------------------------------------------------------------------- inference
  def act(self, tokens_BxT: Array, *, padding_mask_BxT: Optional[Array] = None,
          positions_BxT: Optional[Array] = None, n_cycles: Optional[int] = None, t_steps: Optional[int] = None,
          halt_max_steps: Optional[int] = None, segment_ids_BxT: Optional[Array] = None) -> dict:
    """ACT inference: {'logits' [B,T,V], 'q_logits' ([B,T,2] or [B,2]), 'steps' ([B,T] or [B]) int32,
    'z_L', 'z_H'}. Segments run until every example (position, for q_head_pool 'token') has halted;
    a halted one keeps its state, so its outputs are those of its own last segment."""
    c = self.config
    max_steps = halt_max_steps or c.halt_max_steps
    ctx = self.context(tokens_BxT, padding_mask_BxT, positions_BxT, segment_ids_BxT)
    if self.is_initializing():
      return self._touch(ctx)
    b, t = tokens_BxT.shape
    z_L, z_H = self.initial_state(b, t)
    halted = jnp.zeros(self._halt_shape(b, t), bool)
    if c.q_head_pool == "token":  # padding positions never need a segment
      halted = ~ctx.valid_BxT
    steps = jnp.zeros(halted.shape, jnp.int32)

    def cond(mdl, carry):
      return ~jnp.all(carry[3])

    def body(mdl, carry):
      z_l, z_h, steps, halted = carry
      new_l, new_h = mdl.segment(z_l, z_h, ctx, n_cycles=n_cycles, t_steps=t_steps)
      keep = halted.reshape(halted.shape + (1,) * (3 - halted.ndim))
      z_l, z_h = jnp.where(keep, z_l, new_l), jnp.where(keep, z_h, new_h)
      steps = steps + (~halted).astype(jnp.int32)
      q = mdl.q_logits(z_h, ctx.valid_BxT)
      return z_l, z_h, steps, halted | mdl._halt_now(q, steps, max_steps, halted)

    z_L, z_H, steps, _ = nn.while_loop(cond, body, self, (z_L, z_H, steps, halted))
    logits, q = self.outputs(z_H, ctx.valid_BxT)
    return {"logits": logits, "q_logits": q, "steps": steps, "z_L": z_L, "z_H": z_H}

  def __call__(self, tokens_BxT: Array, *, padding_mask_BxT: Optional[Array] = None,
               positions_BxT: Optional[Array] = None, deterministic: bool = True,
               segment_ids_BxT: Optional[Array] = None) -> Array:
    del deterministic  # HRM has no dropout
    return self.act(tokens_BxT, padding_mask_BxT=padding_mask_BxT, positions_BxT=positions_BxT,
                    segment_ids_BxT=segment_ids_BxT)["logits"]

  def single_pass(self, tokens_BxT: Array, *, padding_mask_BxT: Optional[Array] = None,
                  positions_BxT: Optional[Array] = None) -> Array:
    """Logits of one segment from the initial state (the original trainer's evaluate and sampling)."""
    ctx = self.context(tokens_BxT, padding_mask_BxT, positions_BxT)
    z_L, z_H = self.initial_state(*tokens_BxT.shape)
    _, z_H = self.segment(z_L, z_H, ctx)
    return self.outputs(z_H, ctx.valid_BxT)[0]

  # ------------------------------------------------------------------------------------- training
  def loss(self, batch: Mapping[str, Array], deterministic: bool = True):
    """(objective sum, weight sum, {name: sum}). Evaluation (deterministic) scores the inference path, so
    eval loss is the perplexity `score` reports; training follows train_mode."""
    inputs, targets = batch["inputs"], batch["targets"]
    weights = batch["weights"].astype(jnp.float32)
    segments = batch.get("segment_ids")
    if deterministic:
      xent = jnp.sum(_lm_losses(self(inputs, segment_ids_BxT=segments), targets, "softmax") * weights)
      return xent, jnp.sum(weights), {"xent": xent}
    if self.config.train_mode == "single":
      return self._single_loss(inputs, targets, weights, segments)
    return self._act_loss(inputs, targets, weights, segments)

  def _single_loss(self, inputs, targets, weights, segments=None):
    ctx = self.context(inputs, segment_ids_BxT=segments)
    z_L, z_H = self.initial_state(*inputs.shape)
    _, z_H = self.segment(z_L, z_H, ctx)
    logits, _ = self.outputs(z_H, ctx.valid_BxT)
    objective = jnp.sum(_lm_losses(logits, targets, self.config.loss_fn) * weights)
    return objective, jnp.sum(weights), self._metrics(logits, targets, weights, objective)

  def _metrics(self, logits, targets, weights, objective):
    sums = {"xent": jnp.sum(_lm_losses(logits, targets, "softmax") * weights)}
    if self.config.loss_fn == "stablemax":
      sums["stablemax_xent"] = objective
    return sums

  def _act_loss(self, inputs, targets, weights, segments=None):
    """Deep supervision over halt_max_steps segments (state detached between them); an example stops
    contributing once it halts. With q_learning, upstream's 0.5 * (BCE(q_halt, correct) +
    BCE(q_continue, sigmoid(q of one more segment: q_halt at the last step, else max))) is added, per token
    weight. That extra segment is one more scan iteration (one compiled segment, not two)."""
    c = self.config
    m = c.halt_max_steps
    ctx = self.context(inputs, segment_ids_BxT=segments)
    b, t = inputs.shape
    shape = self._halt_shape(b, t)
    # Exploration (upstream): with probability p an example may not halt before a random step in [2, m].
    k1, k2 = jax.random.split(self.make_rng("dropout"))
    explore = jax.random.bernoulli(k1, c.halt_exploration_prob, shape)
    min_steps = jnp.where(explore, jax.random.randint(k2, shape, 2, m + 1), 0)
    n_tokens = weights if c.q_head_pool == "token" else jnp.sum(weights, axis=-1)  # what one Q decision weighs

    def body(mdl, carry, s):
      z_l, z_h, halted = carry
      new_l, new_h = mdl.segment(jax.lax.stop_gradient(z_l), jax.lax.stop_gradient(z_h), ctx)
      q_new = mdl.q_logits(new_h, ctx.valid_BxT)  # continuing even where halted: the Q-learning target
      keep = halted.reshape(halted.shape + (1,) * (3 - halted.ndim))
      z_l, z_h = jnp.where(keep, z_l, new_l), jnp.where(keep, z_h, new_h)
      logits = mdl.logits(z_h)
      active = (~halted).astype(jnp.float32)
      token_active = active if active.ndim == 2 else active[:, None]
      lm = jnp.sum(_lm_losses(logits, targets, c.loss_fn) * weights * token_active)
      correct = (jnp.argmax(logits, -1) == targets) | (weights == 0)
      correct = correct if c.q_head_pool == "token" else jnp.all(correct, axis=-1)
      want = jax.lax.stop_gradient(q_new[..., 0] > q_new[..., 1]) & (s + 1 >= min_steps) if c.q_learning else False
      halted = halted | want | (s + 1 >= m)
      return (z_l, z_h, halted), (lm, q_new, correct.astype(jnp.float32), active)

    z_L, z_H = self.initial_state(b, t)
    segments = m + 1 if c.q_learning else m
    (z_L, z_H, _), (lm, q, correct, active) = nn.scan(
        body, variable_broadcast="params", split_rngs={"params": False})(
            self, (z_L, z_H, jnp.zeros(shape, bool)), jnp.arange(segments))
    logits = self.logits(z_H)  # each example's output at the segment it halted
    objective = jnp.sum(lm) / m
    sums = self._metrics(logits, targets, weights, objective)
    sums["act_segments"] = jnp.sum(jnp.sum(active, axis=0) * n_tokens)
    if c.q_learning:
      q_next, q, correct, active = q[1:], q[:m], correct[:m], active[:m]
      # [m, 1, ...] against the [m, B(, T)] targets (q has a trailing halt/continue axis)
      is_last = (jnp.arange(m) == m - 1).reshape((m,) + (1,) * (q.ndim - 2))
      target = jax.nn.sigmoid(jnp.where(is_last, q_next[..., 0], jnp.max(q_next, axis=-1)))
      bce = (optax.sigmoid_binary_cross_entropy(q[..., 0], correct)
             + optax.sigmoid_binary_cross_entropy(q[..., 1], jax.lax.stop_gradient(target)))
      q_loss = 0.5 * jnp.sum(bce * active * n_tokens) / m
      objective = objective + q_loss
      sums["q_loss"] = q_loss
    return objective, jnp.sum(weights), sums
