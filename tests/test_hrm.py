"""HRM (jaxlm.models.hrm): the recurrence, ACT (early and batch halting reached), the training objective and its
gradient modes, causality, program size, configs.

References here are written independently of the module's loops: Python loops over the module's single-step
methods (`l_step`, `h_step`, `logits`, `q_logits`), with halting, the training targets and the weighting applied
by hand; the original's batch halting is also checked on its perturbed fixture (fixtures/hrm/perturbed).
"""
import collections
import functools
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config_defaults import load_config
from jaxlm.models import build_model, hrm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERTURBED = os.path.join(ROOT, "tests", "fixtures", "hrm", "perturbed")
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
  """Two rows of which one wants to halt after segment 2 and the other after 3 (of at most 4): each on its own
  takes [2, 3] segments; with the original's batch halting both take 3, fewer than the cap."""
  module = build(q_head_pool="mean", act_batch_halt=True, halt_max_steps=4, n_cycles=1, t_steps=2)
  ids = tokens(b=4)[2:]
  p = with_q_head(params, seed=3)
  np.testing.assert_array_equal(unrolled_act(module, p, ids, 4, 1, 2)[0], [2, 3])
  steps = unrolled_act(module, p, ids, 4, 1, 2, batch_halt=True)[0]
  np.testing.assert_array_equal(steps, [3, 3])
  out = jax.jit(lambda p, x: run(module, p, "act", x))(p, ids)
  np.testing.assert_array_equal(np.asarray(out["steps"]), steps)


def test_early_halting_examples_keep_their_state(params):
  module = build(q_head_pool="mean", halt_max_steps=4, n_cycles=1, t_steps=2)
  ids = tokens(b=4)
  p = with_q_head(params, seed=3)
  act = jax.jit(lambda p, x: run(module, p, "act", x))
  out = act(p, ids)
  steps = np.asarray(out["steps"])
  early = int(np.argmin(steps))
  assert steps[early] < steps.max() and steps[early] < 4  # halted before the cap, while others ran on
  # Its state is the one after its own last segment without halting, although the batch ran on.
  states = independent_states(module, p, ids, 4, 1, 2)
  z_L_then, z_H_then = states[steps[early] - 1]
  np.testing.assert_allclose(np.asarray(out["z_H"][early]), np.asarray(z_H_then[early]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["z_L"][early]), np.asarray(z_L_then[early]), rtol=1e-5, atol=1e-5)
  # And its outputs do not depend on which examples share the batch.
  alone = act(p, ids[early:early + 1])
  np.testing.assert_allclose(np.asarray(alone["logits"][0]), np.asarray(out["logits"][early]), rtol=1e-5, atol=1e-5)
  assert int(alone["steps"][0]) == steps[early]


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory):
  """The original model with trained-like weights and a Q-head that halts (fixtures/hrm/perturbed/README.md),
  read by jaxlm's converter: the original's flags (post-norm, bidirectional, sequence-mean Q-head, batch
  halting), N = T = 2, at most 4 segments."""
  from convert import api
  from jaxlm import modeldir
  path = api.torch2jax(os.path.join(PERTURBED, "hrm_continual_learning.pt"),
                       str(tmp_path_factory.mktemp("hrm") / "model"))
  _, module, params, _ = modeldir.load_model_dir(path)
  return module, jax.tree.map(jnp.asarray, params)


def test_batch_halting_of_the_original_halts_early_with_rows_that_disagree(perturbed):
  """Row 0 wants to halt after segment 1, row 1 not before segment 2: the batch (the original halts only when
  every row wants to) stops after 2 of 4 segments, both rows with their segment-2 outputs; halting each row on
  its own gives [1, 2]. jaxlm equals the hand-written loop and the original's outputs (post-norm blocks with
  norm scales away from 1; measured: logits 6e-7, single pass 6e-7, q 5e-7 of the largest |value|)."""
  module, p = perturbed
  c = module.config
  assert (c.act_batch_halt, c.q_head_pool, c.norm_position, c.n_cycles, c.t_steps, c.halt_max_steps) == (
      True, "mean", "post", 2, 2, 4)
  ref = lambda name: np.load(os.path.join(PERTURBED, name))
  ids = jnp.asarray(ref("input_ids.npy"))
  steps, z_H, q, states = unrolled_act(module, p, ids, 4, 2, 2, batch_halt=True)
  ctx = run(module, p, "context", ids)
  q1 = np.asarray(run(module, p, "q_logits", jnp.asarray(states[0][1]), ctx.valid_BxT))
  assert q1[0, 0] > q1[0, 1] and q1[1, 0] <= q1[1, 1]  # after segment 1: row 0 wants to halt, row 1 does not
  np.testing.assert_array_equal(steps, [2, 2])
  np.testing.assert_array_equal(unrolled_act(module, p, ids, 4, 2, 2)[0], [1, 2])
  out = run(module, p, "act", ids)
  np.testing.assert_array_equal(np.asarray(out["steps"]), steps)
  np.testing.assert_array_equal(np.asarray(out["steps"]), ref("steps.npy"))
  close = lambda got, want: np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6 * np.abs(want).max())
  close(out["z_H"], z_H)
  close(out["q_logits"], q)
  close(out["q_logits"], ref("q_logits.npy"))
  close(out["logits"], ref("logits.npy"))
  close(run(module, p, "single_pass", ids), ref("logits_single_pass.npy"))


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


# ------------------------------------------------------------------------------------------ training objective
# HRM.loss(deterministic=False) written out as upstream HRM trains (sapientinc/HRM: ACTLossHead over the ACT
# wrapper): a Python loop over segments, each from the previous segment's state detached; an example (a position,
# for q_head_pool 'token') runs segments until its Q-head says halt (q_halt > q_continue) or halt_max_steps ran,
# and every segment it runs adds
#   LM:          cross-entropy of that segment's logits, per token weight;
#   Q-halt:      BCE(q_halt, is the prediction correct: argmax == target at every weighted token of the decision);
#   Q-continue:  BCE(q_continue, sigmoid(Q of ONE MORE segment from the new state: its q_halt at the last step,
#                else max(q_halt, q_continue))), the bootstrap target, without gradient;
# Q terms weigh 0.5 * the decision's token weight (a position's weight for 'token', the row's sum for 'mean'),
# and the total is divided by halt_max_steps (jaxlm's mean over the deep-supervision steps, where upstream takes
# one optimizer step per segment). train_mode 'single' is one segment from the initial state.
# A segment is written out too: N*T L updates, an H update after every T-th; grad_mode 'one_step' runs all but
# the final L and H update (and reads its input) without gradient, as upstream's torch.no_grad block.
# Halting decisions and targets come from concrete values of a first pass; the gradient of every segment's
# terms is taken with them fixed, and summed.
def _xent_by_hand(logits, targets, loss_fn):
  if loss_fn == "softmax":
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
  s = jnp.where(logits >= 0, logits + 1.0, 1.0 / (1.0 - jnp.minimum(logits, 0.0)))  # stablemax
  return jnp.log(jnp.sum(s, -1)) - jnp.log(jnp.take_along_axis(s, targets[..., None], -1)[..., 0])


def _bce_by_hand(x, y):
  """-(y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))), stably."""
  return jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _segment_by_hand(module, p, ctx, z_L, z_H):
  c = module.config
  apply = lambda method, *a: module.apply({"params": p}, *a, method=method)
  stop = jax.lax.stop_gradient if c.grad_mode == "one_step" else (lambda x: x)
  z_L, z_H = stop(z_L), stop(z_H)
  last = c.n_cycles * c.t_steps - 1
  for i in range(last + 1):
    z_L = apply("l_step", z_L, z_H, ctx)
    z_L = z_L if i == last else stop(z_L)
    if (i + 1) % c.t_steps == 0:
      z_H = apply("h_step", z_H, z_L, ctx)
      z_H = z_H if i == last else stop(z_H)
  return z_L, z_H


@functools.lru_cache(maxsize=None)
def _segment_terms(module):
  """Jitted: ([LM, Q terms] of one segment from (z_L, z_H), or from the init vectors if `first`, over the
  active tokens/decisions; the gradient of coef . [LM, Q]; the segment's z_L, z_H, q). The loss function and
  whether the init vectors are learned are arguments: one compile per N, T, pool and grad_mode."""
  c = module.config

  def terms(p, batch, z_L, z_H, first, active, target_continue, coef, stablemax, learned_init):
    apply = lambda method, *a: module.apply({"params": p}, *a, method=method)
    inputs, targets, weights = batch["inputs"], batch["targets"], batch["weights"]
    ctx = apply("context", inputs)
    init_L, init_H = (jnp.where(learned_init, p[k], jax.lax.stop_gradient(p[k])) for k in ("init_L", "init_H"))
    z_L, z_H = jnp.where(first, init_L, z_L), jnp.where(first, init_H, z_H)
    z_L, z_H = _segment_by_hand(module, p, ctx, z_L, z_H)
    logits, q = apply("logits", z_H), apply("q_logits", z_H, ctx.valid_BxT)
    token_active = active if active.ndim == 2 else active[:, None]
    xent = jnp.where(stablemax, _xent_by_hand(logits, targets, "stablemax"), _xent_by_hand(logits, targets, "softmax"))
    lm = jnp.sum(xent * weights * token_active)
    correct = (jnp.argmax(logits, -1) == targets) | (weights == 0)
    n_tokens = weights
    if c.q_head_pool != "token":
      correct, n_tokens = jnp.all(correct, -1), jnp.sum(weights, -1)
    q_terms = 0.5 * jnp.sum((_bce_by_hand(q[..., 0], correct.astype(jnp.float32))
                             + _bce_by_hand(q[..., 1], target_continue)) * active * n_tokens)
    values = jnp.stack([lm, q_terms])
    return jnp.dot(coef, values), (values, z_L, z_H, q)

  def values_and_grad(*args):
    (_, (values, *outputs)), grad = jax.value_and_grad(terms, has_aux=True)(*args)
    return values, grad, outputs
  return jax.jit(values_and_grad)


def objective_by_hand(module, params, batch, coef):
  """HRM.loss(deterministic=False) by the loop above: ([LM, Q terms], gradient of coef . [LM, Q], segments each
  decision ran, final z_H)."""
  c = module.config
  shared = module.clone(config=c.replace(train_mode="act", q_learning=True, loss_fn="softmax", init_state="fixed",
                                         halt_max_steps=1, act_batch_halt=False))
  flags = (jnp.asarray(coef, jnp.float32), c.loss_fn == "stablemax", c.init_state == "learned")
  f = lambda *args: _segment_terms(shared)(*args, *flags)
  b, t = batch["inputs"].shape
  shape = (b, t) if c.q_head_pool == "token" else (b,)
  z_L = z_H = jnp.zeros((b, t, c.d_model))
  m = 1 if c.train_mode == "single" else c.halt_max_steps
  halted = np.zeros(shape, bool)
  steps = np.zeros(shape, np.int32)
  values, grads = np.zeros(2), jax.tree.map(jnp.zeros_like, params)
  for s in range(m):
    active = jnp.asarray(~halted, jnp.float32)
    _, _, (new_L, new_H, q) = f(params, batch, z_L, z_H, s == 0, active, jnp.zeros(shape))
    keep = halted.reshape(halted.shape + (1,) * (3 - halted.ndim))
    next_L, next_H = jnp.where(keep, z_L, new_L), jnp.where(keep, z_H, new_H)
    target = jnp.zeros(shape)
    if c.q_learning:  # upstream: one more segment from the new state, run for its Q values only
      q_next = f(params, batch, next_L, next_H, False, active, target)[2][2]
      target = jax.nn.sigmoid(q_next[..., 0] if s == m - 1 else jnp.max(q_next, -1))
    v, g, _ = f(params, batch, z_L, z_H, s == 0, active, target)
    values, grads = values + np.asarray(v), jax.tree.map(jnp.add, grads, g)
    steps += ~halted
    q = np.asarray(q)
    halted = halted | (c.q_learning & (q[..., 0] > q[..., 1])) | (s + 1 >= m)
    z_L, z_H = next_L, next_H
  return values / m, jax.tree.map(lambda g: g / m, grads), steps, z_H


@functools.lru_cache(maxsize=None)
def _loss_and_grad(module, part):
  """Jitted (objective, weight, sums) of HRM.loss and the gradient of its `part`: 'total', 'lm' (without the
  Q-learning term `q_loss`) or 'q' (that term)."""
  def selected(p, batch):
    total, weight, sums = module.apply({"params": p}, batch, deterministic=False,
                                       rngs={"dropout": jax.random.key(0)}, method="loss")
    q = sums.get("q_loss", 0.0)
    return {"total": total, "lm": total - q, "q": q}[part], (total, weight, sums)

  def run_(p, batch):
    (_, out), grad = jax.value_and_grad(selected, has_aux=True)(p, batch)
    return out, grad
  return jax.jit(run_)


def _max_rel_diff(a, b):
  """max |a - b| over the leaves, each relative to that leaf's largest |b|."""
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) / max(float(np.abs(np.asarray(y)).max()), 1e-12)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


OBJECTIVES = {
    # the original trainer's objective: one segment from the initial state (upstream's stablemax here; a learned
    # initial state, which 'full' reaches and 'one_step' does not)
    "single": dict(train_mode="single", loss_fn="stablemax", init_state="learned"),
    # configs/hrm.py's: deep supervision over ACT segments with Q-learning, one Q decision per position; the Q-head
    # below halts positions after 1, 2 and 3 (the cap) segments. Compared without its Q term (next test).
    "act": dict(train_mode="act", q_learning=True, q_head_pool="token", halt_max_steps=3),
    # one segment and the bootstrap from one more (its q_halt: the last step): the whole objective compared
    "act-one-segment": dict(train_mode="act", q_learning=True, q_head_pool="token", halt_max_steps=1),
}
GRAD_MODES = {"single": ("one_step", "full"), "act": ("one_step", "full"), "act-one-segment": ("one_step",)}
PART = {"single": "total", "act": "lm", "act-one-segment": "total"}


@functools.lru_cache(maxsize=None)
def _objective_params():
  params = nn.unbox(jax.jit(build().init)(jax.random.key(0), tokens())["params"])  # = the `params` fixture
  return with_q_head(params, seed=8, scale=0.5)


def _objective_case(objective, grad_mode):
  p = _objective_params()
  ids = tokens(b=2)
  batch = {"inputs": ids, "targets": jnp.roll(ids, -1, axis=1), "weights": jnp.ones(ids.shape).at[1, 5:].set(0.0)}
  module = build(grad_mode=grad_mode, n_cycles=2, t_steps=2, halt_exploration_prob=0.0, **OBJECTIVES[objective])
  return module, p, batch


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_training_objective_equals_a_per_segment_loop(objective):
  """Value and gradient of HRM.loss equal the loop above (for 'act' without the Q term `q_loss`, which the next
  test has), under both gradient modes; those give the same value and different gradients ('one_step': none to
  a learned initial state). Measured: values within 1e-7 relative, gradients within 3e-6 of each leaf's largest
  entry."""
  part = PART[objective]
  values = {}
  for grad_mode in GRAD_MODES[objective]:
    module, p, batch = _objective_case(objective, grad_mode)
    (total, weight, sums), grad = _loss_and_grad(module, part)(p, batch)
    total = float(total)
    coef = (1.0, 1.0) if part == "total" and module.config.q_learning else (1.0, 0.0)
    (lm, q), want_grad, steps, z_H = objective_by_hand(module, p, batch, coef)
    got = total - float(sums.get("q_loss", 0.0)) if part == "lm" else total
    want = lm if coef[1] == 0 else lm + q
    value_err, grad_err = abs(got - want) / abs(want), _max_rel_diff(grad, want_grad)
    print(f"\n{objective}/{grad_mode}: {part} {got:.6g} (loop {want:.6g}, rel {value_err:.2g}), gradient max rel "
          f"{grad_err:.2g}; segments run {steps.tolist()}")
    assert value_err <= 2e-6 and grad_err <= 1e-4
    if objective == "act-one-segment":
      assert abs(float(sums["q_loss"]) - q) <= 2e-6 * q
    # the metrics: xent of the output each decision halted at; segments run per weighted token
    w = batch["weights"]
    logits = run(module, p, "logits", z_H)
    want_xent = float(jnp.sum(_xent_by_hand(logits, batch["targets"], "softmax") * w))
    np.testing.assert_allclose(float(sums["xent"]), want_xent, rtol=2e-6)
    assert float(weight) == float(jnp.sum(w))
    if objective == "single":
      assert sorted(sums) == ["stablemax_xent", "xent"] and float(sums["stablemax_xent"]) == total
    else:
      assert sorted(sums) == ["act_segments", "q_loss", "xent"]
      assert float(sums["act_segments"]) == float(jnp.sum(steps * w))
    if objective == "act":  # halting inside training: decisions halt after 1, 2 and 3 (the cap) segments
      assert set(steps[np.asarray(w) > 0].tolist()) == {1, 2, 3}, steps
    values[grad_mode] = got, grad
  if len(values) == 1:
    return
  (v_one, g_one), (v_full, g_full) = values["one_step"], values["full"]
  assert abs(v_one - v_full) <= 1e-6 * abs(v_full)
  if objective == "single":
    for name in ("init_L", "init_H"):
      assert float(jnp.abs(g_one[name]).max()) == 0.0, name
      assert float(jnp.abs(g_full[name]).max()) > 0.0, name
  assert _max_rel_diff(g_one["L_module"], g_full["L_module"]) > 1e-2


@pytest.mark.parametrize("grad_mode", ["one_step", "full"])
def test_q_learning_term_equals_the_per_segment_loop(grad_mode):
  """The Q term (`q_loss`: Q-halt towards 'correct', Q-continue towards the bootstrap from the next segment) of
  the 'act' objective above, with halting after 1, 2 and 3 segments: value and gradient."""
  module, p, batch = _objective_case("act", grad_mode)
  (_, q), want_grad, _, _ = objective_by_hand(module, p, batch, (0.0, 1.0))
  (_, _, sums), _ = _loss_and_grad(module, "lm")(p, batch)  # compiled by the test above
  print(f"\nact/{grad_mode}: Q term {float(sums['q_loss']):.6g} (loop {q:.6g})")
  assert abs(float(sums["q_loss"]) - q) <= 2e-6 * q
  _, grad = _loss_and_grad(module, "q")(p, batch)
  assert _max_rel_diff(grad, want_grad) <= 1e-4


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


# ------------------------------------------------------------------------------------------ program size
def _lowered_ops(text):
  """StableHLO ops by name (constants' values and SSA names ignored)."""
  return collections.Counter(re.findall(r"\b(?:stablehlo|chlo|func|call)\.[a-z_]+\b", text))


def _compiled_ops(text):
  """Optimised HLO instructions by opcode."""
  return collections.Counter(re.findall(r"(?m)^\s*(?:ROOT\s+)?%\S+\s*=\s*.*?\s([a-z][\w\-]*)\(", text))


def test_program_does_not_grow_with_reasoning_mode_or_segments(params, no_compilation_cache):
  """One program for every N, T and halt_max_steps: fast (1 x 1, 2 segments) against extreme (6 x 4, 8 segments).
  Lowered, inference and the gradients of both training objectives have the same ops (only constants differ:
  1033, 1656 and 2818 ops); compiled, inference has the same 4 while loops and the same number of instructions to
  within 1% (measured 1624 vs 1629: XLA folds a few constants differently). Python loops over steps or segments
  would multiply the ops; trip counts XLA could see would let it delete fast mode's loops of trip count 0 and 1
  (fewer while loops). ('full' gradients use scans of static length, which XLA may unroll: not checked.)"""
  ids = tokens(b=1, t=4)
  batch = {"inputs": ids, "targets": ids, "weights": jnp.ones(ids.shape)}

  def lowered(what, **changes):
    module = build(**changes)
    if what == "inference":
      fn = lambda p: module.apply({"params": p}, ids)
    else:
      fn = jax.grad(lambda p: module.apply({"params": p}, batch, deterministic=False,
                                           rngs={"dropout": jax.random.key(0)}, method="loss")[0])
    return jax.jit(fn).lower(params)

  for what, changes, compiled in [("inference", {}, True), ("training", {}, False),
                                  ("training", dict(train_mode="act", q_learning=True), False)]:
    fast = lowered(what, n_cycles=1, t_steps=1, halt_max_steps=2, **changes)
    extreme = lowered(what, n_cycles=6, t_steps=4, halt_max_steps=8, **changes)
    ops_fast, ops_extreme = _lowered_ops(fast.as_text()), _lowered_ops(extreme.as_text())
    print(f"\n{what} {changes}: lowered ops {sum(ops_fast.values())} / {sum(ops_extreme.values())}, "
          f"while loops {ops_fast['stablehlo.while']}")
    assert ops_fast == ops_extreme and ops_fast["stablehlo.while"] >= 3, what
    if compiled:
      ops_fast, ops_extreme = _compiled_ops(fast.compile().as_text()), _compiled_ops(extreme.compile().as_text())
      n_fast, n_extreme = sum(ops_fast.values()), sum(ops_extreme.values())
      print(f"  compiled: instructions {n_fast} / {n_extreme}, while loops {ops_fast['while']} / {ops_extreme['while']}")
      assert ops_fast["while"] == ops_extreme["while"] >= 3, what
      assert abs(n_fast - n_extreme) <= 0.01 * n_extreme, what


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
