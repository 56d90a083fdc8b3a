"""HRM (jaxlm.models.hrm): the recurrence, ACT, gradient modes, causality, compile time, configs.

References here are written independently of the module's loops: Python loops over the module's single-step
methods (`l_step`, `h_step`, `q_logits`), with halting applied by hand.
"""
import functools
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config_defaults import load_config
from jaxlm.models import build_model, hrm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(arch="hrm", vocab_size=40, d_model=32, n_heads=2, l_layers=1, h_layers=1, mlp_multiple=32,
             halt_max_steps=3)
ORIGINAL_FLAGS = dict(causal=False, norm_position="post", q_head_pool="mean", act_batch_halt=True,
                      mlp_rounding="int")


def build(**changes):
  return build_model({**SMALL, **changes})[1]


def tokens(b=3, t=8, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, SMALL["vocab_size"], (b, t)), jnp.int32)


@pytest.fixture(scope="module")
def params():
  """Parameters shared by every pre-norm SMALL variant (flags below do not change shapes)."""
  return nn.unbox(jax.jit(build().init)(jax.random.key(0), tokens())["params"])


@pytest.fixture(scope="module")
def post_params():
  return nn.unbox(jax.jit(build(**ORIGINAL_FLAGS).init)(jax.random.key(1), tokens())["params"])


def with_q_head(params, seed, scale=3.0):
  """A Q-head whose halt decision depends on the state (the initial one never halts)."""
  rng = np.random.RandomState(seed)
  p = jax.tree.map(lambda x: x, nn.unbox(params))
  p["q_head"] = {"kernel": jnp.asarray(rng.randn(*p["q_head"]["kernel"].shape) * scale, jnp.float32),
                 "bias": jnp.zeros((2,), jnp.float32)}
  return p


@functools.lru_cache(maxsize=None)
def _jitted(module, method, static):
  return jax.jit(lambda p, arrays, *args: module.apply({"params": p}, *args, method=method, **arrays, **dict(static)))


def run(module, params, method, *args, **kwargs):
  """module.apply(..., method=method), jitted once per (module, method, non-array kwargs): eager Flax is slow."""
  if method == "initial_state":  # takes static sizes
    return module.apply({"params": params}, *args, method=method)
  arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
  static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in arrays))
  return _jitted(module, method, static)(params, arrays, *args)


def python_segment(module, params, ctx, z_L, z_H, n, t):
  """The original's schedule written out: for i < N*T: z_L <- L; after every T-th step: z_H <- H."""
  for i in range(n * t):
    z_L = run(module, params, "l_step", z_L, z_H, ctx)
    if (i + 1) % t == 0:
      z_H = run(module, params, "h_step", z_H, z_L, ctx)
  return z_L, z_H


# ------------------------------------------------------------------------------------------ recurrence
@pytest.mark.parametrize("grad_mode", ["one_step", "full"])
def test_scan_and_while_equal_a_python_loop(params, grad_mode):
  module = build(n_cycles=3, t_steps=2)
  ids = tokens()
  ctx = run(module, params, "context", ids)
  z_L, z_H = run(module, params, "initial_state", *ids.shape)
  want = python_segment(module, params, ctx, z_L, z_H, 3, 2)
  got = jax.jit(lambda p, c, a, b: run(module, p, "segment", a, b, c, grad_mode=grad_mode))(params, ctx, z_L, z_H)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def unrolled_act(module, params, ids, max_steps, n, t, batch_halt=False):
  """ACT by hand: a Python loop over segments; after each, halted examples (positions) take back their
  previous state. Returns (steps, final z_H, final q, the states after each segment)."""
  ctx = run(module, params, "context", ids)
  z_L, z_H = run(module, params, "initial_state", *ids.shape)
  q = run(module, params, "q_logits", z_H, ctx.valid_BxT)
  halted = np.zeros(q.shape[:-1], bool)
  steps = np.zeros(q.shape[:-1], np.int32)
  states = []
  for _ in range(max_steps):
    new_L, new_H = python_segment(module, params, ctx, z_L, z_H, n, t)
    keep = halted.reshape(halted.shape + (1,) * (3 - halted.ndim))
    z_L, z_H = np.where(keep, z_L, new_L), np.where(keep, z_H, new_H)
    states.append((z_L, z_H))
    steps += ~halted
    q = np.asarray(run(module, params, "q_logits", jnp.asarray(z_H), ctx.valid_BxT))
    want = q[..., 0] > q[..., 1]
    halted |= (want.all() if batch_halt else want) | (steps >= max_steps)
    if halted.all():
      break
  return steps, z_H, q, states


def independent_states(module, params, ids, max_steps, n, t):
  """z_H of every example after 1..max_steps segments, no halting."""
  ctx = run(module, params, "context", ids)
  z_L, z_H = run(module, params, "initial_state", *ids.shape)
  out = []
  for _ in range(max_steps):
    z_L, z_H = python_segment(module, params, ctx, z_L, z_H, n, t)
    out.append((np.asarray(z_L), np.asarray(z_H)))
  return out


@pytest.mark.parametrize("pool", ["mean", "token"])
def test_while_loop_act_equals_unrolled_masked_computation(params, pool):
  module = build(q_head_pool=pool, halt_max_steps=4, n_cycles=1, t_steps=2)
  ids = tokens(b=4)
  p = with_q_head(params, seed=3)
  steps, z_H, q, _ = unrolled_act(module, p, ids, 4, 1, 2)
  assert len(np.unique(steps)) > 1, f"the test Q-head should halt examples at different segments: {steps}"
  out = jax.jit(lambda p, x: run(module, p, "act", x))(p, ids)
  np.testing.assert_array_equal(np.asarray(out["steps"]), steps)
  np.testing.assert_allclose(np.asarray(out["z_H"]), z_H, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["q_logits"]), q, rtol=1e-4, atol=1e-4)
  logits = run(module, p, "logits", jnp.asarray(z_H))
  np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(logits), rtol=1e-4, atol=1e-4)


def test_batch_halting_waits_for_every_row(params):
  module = build(q_head_pool="mean", act_batch_halt=True, halt_max_steps=4, n_cycles=1, t_steps=2)
  ids = tokens(b=4)
  p = with_q_head(params, seed=3)
  steps, _, _, _ = unrolled_act(module, p, ids, 4, 1, 2, batch_halt=True)
  out = jax.jit(lambda p, x: run(module, p, "act", x))(p, ids)
  np.testing.assert_array_equal(np.asarray(out["steps"]), steps)
  assert len(np.unique(np.asarray(out["steps"]))) == 1


def test_early_halting_examples_keep_their_state(params):
  module = build(q_head_pool="mean", halt_max_steps=4, n_cycles=1, t_steps=2)
  ids = tokens(b=4)
  p = with_q_head(params, seed=3)
  act = jax.jit(lambda p, x: run(module, p, "act", x))
  out = act(p, ids)
  steps = np.asarray(out["steps"])
  early = int(np.argmin(steps))
  assert steps[early] < steps.max()
  # Its state is the one after its own last segment without halting, although the batch ran on.
  states = independent_states(module, p, ids, 4, 1, 2)
  z_L_then, z_H_then = states[steps[early] - 1]
  np.testing.assert_allclose(np.asarray(out["z_H"][early]), np.asarray(z_H_then[early]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["z_L"][early]), np.asarray(z_L_then[early]), rtol=1e-5, atol=1e-5)
  # And its outputs do not depend on which examples share the batch.
  alone = act(p, ids[early:early + 1])
  np.testing.assert_allclose(np.asarray(alone["logits"][0]), np.asarray(out["logits"][early]), rtol=1e-5, atol=1e-5)
  assert int(alone["steps"][0]) == steps[early]


def test_padding_does_not_change_outputs_of_real_positions(post_params):
  """generate pads a window on the right; with the original's bidirectional attention and sequence-mean
  Q-head, masked padding must leave logits and halting exactly as for the short sequence."""
  module = build(**{**ORIGINAL_FLAGS, "act_batch_halt": False}, halt_max_steps=3, n_cycles=1, t_steps=2)
  p = with_q_head(post_params, seed=5, scale=1.0)
  short = tokens(b=1, t=6, seed=4)
  padded = jnp.concatenate([short, jnp.zeros((1, 4), jnp.int32)], axis=1)
  mask = jnp.arange(10)[None] < 6
  a = run(module, p, "act", short)
  b = run(module, p, "act", padded, padding_mask_BxT=mask)
  np.testing.assert_allclose(np.asarray(b["logits"][:, :6]), np.asarray(a["logits"]), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(b["steps"]), np.asarray(a["steps"]))


# ------------------------------------------------------------------------------------------ gradients
def _grads(module, params, batch):
  loss = lambda p: module.apply({"params": p}, batch, deterministic=False, rngs={"dropout": jax.random.key(0)},
                                method="loss")[0]
  return jax.jit(jax.grad(loss))(params)


def test_gradient_modes(params):
  """one_step: the gradient is that of the last L and H update applied to a constant state (nothing reaches
  the initial state); full: the initial states get gradient through every step."""
  ids = tokens(b=2)
  batch = {"inputs": ids, "targets": jnp.roll(ids, -1, axis=1), "weights": jnp.ones(ids.shape)}
  one = build(init_state="learned", grad_mode="one_step", n_cycles=3, t_steps=2)
  full = build(init_state="learned", grad_mode="full", n_cycles=3, t_steps=2)
  g_one, g_full = _grads(one, params, batch), _grads(full, params, batch)
  for name in ("init_L", "init_H"):
    assert float(jnp.abs(g_one[name]).max()) == 0.0, name
    assert float(jnp.abs(g_full[name]).max()) > 0.0, name

  # The prefix (5 L and 2 H updates) as constants, then the final L and H update with gradient.
  steps = build(n_cycles=3, t_steps=2)  # the same single-step methods (and compiled programs) as above
  ctx = run(steps, params, "context", ids)
  z_L, z_H = run(steps, params, "initial_state", *ids.shape)
  for i in range(5):
    z_L = run(steps, params, "l_step", z_L, z_H, ctx)
    if i % 2:
      z_H = run(steps, params, "h_step", z_H, z_L, ctx)

  def last_step_loss(p):
    c = one.apply({"params": p}, ids, method="context")
    z_l = one.apply({"params": p}, z_L, z_H, c, method="l_step")
    logits = one.apply({"params": p}, one.apply({"params": p}, z_H, z_l, c, method="h_step"), method="logits")
    return jnp.sum(jax.nn.log_softmax(logits) * -jax.nn.one_hot(batch["targets"], SMALL["vocab_size"]))

  want = jax.jit(jax.grad(last_step_loss))(params)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(g_one), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-4, atol=2e-5, err_msg=str(path))
  # 'full' differs exactly because earlier steps contribute.
  assert float(jnp.abs(g_full["L_module"]["layers_0"]["mlp"]["wo"]["kernel"]
                       - g_one["L_module"]["layers_0"]["mlp"]["wo"]["kernel"]).max()) > 1e-6


# ------------------------------------------------------------------------------------------ causality
def _embedding_jacobian(module, params, ids):
  """d logits[t] / d x[s] of one segment, as a [T, S] map of max |entries|."""
  ctx = run(module, params, "context", ids)
  z_L, z_H = run(module, params, "initial_state", *ids.shape)

  def logits_of(x):
    _, z = run(module, params, "segment", z_L, z_H, ctx._replace(x_BxTxD=x), grad_mode="full")
    return run(module, params, "logits", z)[0]

  jac = jax.jit(jax.jacrev(logits_of))(ctx.x_BxTxD)  # [T, V, 1, S, D]
  return np.abs(np.asarray(jac)).max(axis=(1, 2, 4))


def test_default_model_is_causal(params, post_params):
  ids = tokens(b=1, t=6)
  causal = _embedding_jacobian(build(n_cycles=2, t_steps=2), params, ids)
  assert np.all(causal[np.triu_indices(6, k=1)] == 0.0)
  assert np.all(np.diag(causal) > 0.0)
  leaky = _embedding_jacobian(build(**ORIGINAL_FLAGS, n_cycles=2, t_steps=2), post_params, ids)
  assert np.all(leaky[np.triu_indices(6, k=1)] > 0.0)  # the original attends to the future


def test_act_with_per_position_halting_is_causal(params):
  """Changing later tokens changes neither logits nor halting of earlier positions (halting included)."""
  module = build(halt_max_steps=4, n_cycles=1, t_steps=2)
  p = with_q_head(params, seed=7)
  a, b = tokens(b=2, t=8, seed=1), tokens(b=2, t=8, seed=1).at[:, 5:].set(tokens(b=2, t=3, seed=2))
  act = jax.jit(lambda p, x: run(module, p, "act", x))
  out_a, out_b = act(p, a), act(p, b)
  assert len(np.unique(np.asarray(out_a["steps"]))) > 1
  np.testing.assert_array_equal(np.asarray(out_a["steps"][:, :5]), np.asarray(out_b["steps"][:, :5]))
  np.testing.assert_allclose(np.asarray(out_a["logits"][:, :5]), np.asarray(out_b["logits"][:, :5]),
                             rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ compile time
def test_compile_time_does_not_grow_with_reasoning_mode(params, no_compilation_cache):
  """Same program for every N and T (fast 1x1 vs extreme 6x4), for inference and one-step training.
  Measured again once if the first pair is off (the machine may be busy)."""
  ids = tokens(b=2, t=16)
  batch = {"inputs": ids, "targets": ids, "weights": jnp.ones(ids.shape)}

  def compile_seconds(mode, what):
    module = build_model(hrm.apply_reasoning_mode(SMALL, mode))[1]
    if what == "inference":
      fn = lambda p: module.apply({"params": p}, ids)
    else:
      fn = jax.grad(lambda p: module.apply({"params": p}, batch, deterministic=False,
                                           rngs={"dropout": jax.random.key(0)}, method="loss")[0])
    start = time.perf_counter()
    jax.jit(fn).lower(params).compile()
    return time.perf_counter() - start

  for what in ("inference", "training"):
    for attempt in range(2):
      fast, extreme = compile_seconds("fast", what), compile_seconds("extreme", what)
      print(f"\n{what} compile: fast {fast:.2f}s, extreme {extreme:.2f}s")
      if extreme <= 1.5 * fast:
        break
    assert extreme <= 1.5 * fast, (what, fast, extreme)


# ------------------------------------------------------------------------------------------ losses
def test_training_losses(params):
  ids = tokens(b=2)
  batch = {"inputs": ids, "targets": jnp.roll(ids, -1, axis=1), "weights": jnp.ones(ids.shape).at[1, 4:].set(0.0)}
  module = build(train_mode="act", q_learning=True, loss_fn="stablemax")
  apply = lambda p: module.apply({"params": p}, batch, deterministic=False, rngs={"dropout": jax.random.key(0)},
                                 method="loss")
  (total, (weight, sums)), grads = jax.jit(jax.value_and_grad(lambda p: (lambda o: (o[0], o[1:]))(apply(p)),
                                                              has_aux=True))(params)
  assert float(weight) == 12.0
  assert set(sums) == {"xent", "stablemax_xent", "q_loss", "act_segments"}
  assert float(sums["act_segments"]) / float(weight) <= SMALL["halt_max_steps"]
  assert np.isfinite(float(total)) and float(sums["q_loss"]) > 0
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["q_head"]["kernel"]).max()) > 0  # the Q-head learns


def test_stablemax_cross_entropy_formula():
  logits = jnp.asarray([[[-2.0, 0.0, 3.0, -0.5]]])
  s = np.array([1 / 3, 1.0, 4.0, 1 / 1.5])
  got = hrm._lm_losses(logits, jnp.asarray([[2]]), "stablemax")
  np.testing.assert_allclose(float(got[0, 0]), -np.log(s[2] / s.sum()), rtol=1e-6)


def test_eval_loss_scores_the_inference_path(params):
  module = build()
  ids = tokens(b=2)
  batch = {"inputs": ids, "targets": jnp.roll(ids, -1, axis=1), "weights": jnp.ones(ids.shape)}
  xent, _, sums = run(module, params, "loss", batch, deterministic=True)
  logits = run(module, params, "act", ids)["logits"]
  want = -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1))
  np.testing.assert_allclose(float(xent), float(want), rtol=1e-5)
  assert sums.keys() == {"xent"}


# ------------------------------------------------------------------------------------------ configs
def _trainable(model_dict):
  _, module = build_model(model_dict)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  flat = jax.tree_util.tree_leaves_with_path(nn.unbox(shapes["params"]))
  return sum(x.size for path, x in flat if "init_" not in jax.tree_util.keystr(path))


def test_parameter_counts_of_the_original_size():
  original = load_config(os.path.join(ROOT, "configs", "hrm.py:original")).model.to_dict()
  assert _trainable({**original, "vocab_size": 100}) == 3_986_946  # SPEC.md (buffers z0_L/z0_H excluded)
  default = load_config(os.path.join(ROOT, "configs", "hrm.py")).model.to_dict()
  assert _trainable({**default, "vocab_size": 100}) == 3_986_946 + 2 * 256  # + the pre-norm final norms


def test_reasoning_modes():
  config = build_model(SMALL)[0]
  assert hrm.REASONING_MODES == {"fast": (1, 1), "normal": (2, 2), "deep": (3, 2), "thorough": (4, 3),
                                 "extreme": (6, 4)}
  deep = hrm.apply_reasoning_mode(config, "deep")
  assert (deep.n_cycles, deep.t_steps) == (3, 2)
  assert hrm.apply_reasoning_mode(config, "extreme", t_steps=1).t_steps == 1  # explicit values win
  assert hrm.apply_reasoning_mode(SMALL, n_cycles=5)["n_cycles"] == 5
  with pytest.raises(ValueError, match="unknown reasoning mode 'slow'"):
    hrm.apply_reasoning_mode(config, "slow")
  with pytest.raises(ValueError, match="t_steps must be >= 1"):
    hrm.apply_reasoning_mode(config, t_steps=0)


@pytest.mark.parametrize("change,message", [
    (dict(norm_position="sandwich"), "model.norm_position"),
    (dict(q_head_pool="max"), "model.q_head_pool"),
    (dict(q_learning=True), "model.q_learning needs model.train_mode='act'"),
    (dict(n_heads=3), "model.n_heads=3"),
    (dict(n_cycles=0), "model.n_cycles must be >= 1"),
    (dict(hidden_size=64), r"unknown model config field\(s\) \['hidden_size'\]"),
])
def test_bad_configs_name_the_field(change, message):
  with pytest.raises(ValueError, match=message):
    build_model({**SMALL, **change})
