"""HRM-Text1 model: the original's fixture (logits, halt probabilities, loss, greedy tokens), the scanned pondering
against a literal Python loop (early exit included), gradients through every step, causality, padding, and the
full-size parameter count.

The Python loop below follows SPEC.md line by line (real `break`s on concrete values) and calls the module's own
block pair and halt head through `HRMLayer.apply`, so it checks the scan/masking machinery, not the blocks.
"""
import collections
import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models import build_model, layers
from jaxlm.models.hrm_text1 import HRMLayer, HRMText1, HRMText1Config

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hrm_text1")
PERTURBED = os.path.join(FIXTURE, "perturbed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The fixture's sizes with jaxlm's default flags (dropout stays 0.1: every test but one runs deterministic).
SMALL = dict(vocab_size=96, d_model=64, n_heads=4, n_layers=2, d_ff=128, max_seq_len=64, halt_max_steps=4)


def fixture(name):
  return np.load(os.path.join(FIXTURE, name))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """(config, module, params) of the original's fixture checkpoint, read by convert torch2jax."""
  from convert import api
  from jaxlm import modeldir
  path = api.torch2jax(FIXTURE, str(tmp_path_factory.mktemp("hrm_text1") / "model"))
  config, module, params, _ = modeldir.load_model_dir(path)
  return config, module, jax.tree.map(jnp.asarray, params)


@functools.lru_cache(maxsize=None)
def _ponder_fn(config):
  """One jitted forward per config (compiling the nested scans dominates these tests' time)."""
  module = HRMText1(config)
  return jax.jit(lambda p, t, m: module.apply({"params": p}, t, padding_mask_BxT=m, method="ponder"))


def ponder(module, params, tokens, mask=None):
  return _ponder_fn(module.config)(params, jnp.asarray(tokens), None if mask is None else jnp.asarray(mask))


# ------------------------------------------------------------------------------------- the original's fixture
def test_fixture_logits_halt_probs_and_loss(imported):
  config, module, params = imported
  assert (config.ponder_loss, config.exit_over_padding) == ("count", True)  # the original's behaviour
  ids = fixture("input_ids.npy")
  out = ponder(module, params, ids)
  want = fixture("logits.npy")
  err = float(np.abs(np.asarray(out["logits"]) - want).max())
  scale = float(np.abs(want).max())
  halt_err = float(np.abs(np.asarray(out["halt_probs"]) - fixture("halt_probs.npy")).max())
  # The original's loss: CE over shifted labels (mean) + 0.01 * mean(n_updates).
  targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
  weights = np.ones(ids.shape, np.float32)
  weights[:, -1] = 0.0
  total, weight, sums = jax.jit(lambda p, b: module.apply({"params": p}, b, method="loss"))(
      params, {"inputs": ids, "targets": targets, "weights": weights})
  loss_err = abs(float(total / weight) - float(fixture("loss.npy")))
  print(f"\nhrm_text1 fixture: logits max abs err {err:.3g} (largest logit {scale:.1f}, relative {err / scale:.2g}); "
        f"halt_probs {halt_err:.3g}; loss {loss_err:.3g}")
  assert err / scale <= 1.5e-5
  assert halt_err <= 1e-5
  assert loss_err <= 1e-5 * float(fixture("loss.npy"))
  assert float(sums["ponder"] / weight) == 2 * 3  # n_layers * (halt_max_steps - 1): no early exit
  np.testing.assert_array_equal(np.asarray(out["n_updates"]), [3, 3])


def test_fixture_greedy_tokens(imported):
  from jaxlm.generate import sample_ids
  _, module, params = imported
  prompt = [int(i) for i in fixture("input_ids.npy")[0, :8]]
  new = sample_ids(module, params, prompt, 16, context=24, temperature=0.0)
  np.testing.assert_array_equal(new, fixture("greedy_tokens.npy"))


# ------------------------------------------------------------------------------------- reference loop
def _layer_params(params, i):
  return jax.tree.map(lambda x: x[i], params["layers"])


def _layer_fns(config):
  """Jitted (halt_prob, inner) of one HRMLayer: the loop below calls them step by step. The pondering flags and
  remat do not change a deterministic block pair, so all variants share one compile."""
  return _layer_fns_for(dataclasses.replace(config, ponder_loss="count", exit_over_padding=True, remat=True))


@functools.lru_cache(maxsize=None)
def _layer_fns_for(config):
  layer = HRMLayer(config)
  halt = jax.jit(lambda p, zH: layer.apply(p, zH, method="halt_prob"))
  inner = jax.jit(lambda p, zH, zL, pos, m: layer.apply(p, zH, zL, pos, m, method="inner"))
  return halt, inner


def loop_forward(config, params, tokens, mask=None, steps=None):
  """The original forward as written (SPEC.md), with `torch.all(rem < eps)` over valid positions.

  steps: per-layer number of halt reads to run (from a previous concrete run), so the loop can be traced by
  jax.grad; None decides the early exits on concrete values. Returns (logits, halt probs per layer, halt reads
  per layer, expected number of updates [B, T]).
  """
  c = config
  tokens = jnp.asarray(tokens)
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  attn_mask = layers.attention_mask(positions, positions, causal=True, window=None,
                                    k_valid_BxS=None if mask is None else jnp.asarray(mask))
  valid = np.ones((b, t), bool) if mask is None or c.exit_over_padding else np.asarray(mask, bool)
  halt, inner = _layer_fns(c)
  embedding = params["embed"]["embedding"]
  zL = embedding[tokens]
  zH = jnp.zeros_like(zL)
  total = jnp.zeros_like(zL)
  probs, ran = [], []
  expected = jnp.zeros((b, t))
  for i in range(c.n_layers):
    lp = {"params": _layer_params(params, i)}
    rem = jnp.ones((b, t))
    layer_probs = []
    for step in range(c.halt_max_steps):
      p_raw = halt(lp, zH)
      layer_probs.append(p_raw)
      p = jnp.clip(p_raw, c.halt_eps, 1 - c.halt_eps)
      last = step == c.halt_max_steps - 1
      total = total + (rem * (jnp.ones_like(p) if last else p))[..., None] * zH
      if last:
        break
      rem = rem * (1 - p)
      expected = expected + rem
      stop = (step + 1 == steps[i]) if steps is not None else bool(jnp.all(np.asarray(rem)[valid] < c.halt_eps))
      if stop:
        break
      zH, zL = inner(lp, zH, zL, positions, attn_mask)
    probs.append(layer_probs)
    ran.append(len(layer_probs))
  x = layers.RMSNorm(eps=c.norm_eps).apply({"params": params["final_norm"]}, total)
  return x @ embedding.T, probs, ran, expected


@functools.lru_cache(maxsize=None)
def _init_fn(config):
  module = HRMText1(config)
  return jax.jit(lambda key: nn.unbox(module.init(key, jnp.zeros((1, 8), jnp.int32))["params"]))


def small_model(seed=0, **changes):
  config = HRMText1Config.from_dict({**SMALL, **changes})
  return config, HRMText1(config), _init_fn(config)(jax.random.key(seed))


@functools.lru_cache(maxsize=None)
def _loss_fn(config):
  """Jitted ((objective, weight, sums), d objective / d params) for a config."""
  module = HRMText1(config)

  def objective(params, batch):
    total, weight, sums = module.apply({"params": params}, batch, method="loss")
    return total, (weight, sums)

  def run(params, batch):
    (total, (weight, sums)), grads = jax.value_and_grad(objective, has_aux=True)(params, batch)
    return (total, weight, sums), grads
  return jax.jit(run)


def tokens(seed, b=2, t=24, v=96):
  return np.random.RandomState(seed).randint(0, v, (b, t)).astype(np.int32)


def assert_matches_loop(config, module, params, ids, mask=None):
  out = ponder(module, params, ids, mask)
  logits, probs, ran, _ = loop_forward(config, params, ids, mask)
  scale = float(np.abs(logits).max())
  np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(logits), atol=2e-6 * scale, rtol=0)
  # n_updates = halt reads - 1 (a layer that reads all M halts updated M - 1 times; an exit at read k, k times)
  updates = [r - 1 if r == config.halt_max_steps else r for r in ran]
  np.testing.assert_array_equal(np.asarray(out["n_updates"]), updates)
  for i, layer_probs in enumerate(probs):
    np.testing.assert_allclose(np.asarray(out["halt_probs"][i, :len(layer_probs)]), np.stack(layer_probs),
                               atol=1e-5)
    assert not np.asarray(out["halt_probs"][i, len(layer_probs):]).any()  # never evaluated: reported as 0
  return updates


def test_scan_equals_python_loop_on_the_fixture(imported):
  config, module, params = imported
  assert assert_matches_loop(config, module, params, fixture("input_ids.npy")) == [3, 3]


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory):
  """fixtures/hrm_text1/perturbed (README there), read by convert torch2jax: trained-like weights, halt head 0
  saturated."""
  from convert import api
  from jaxlm import modeldir
  path = api.torch2jax(PERTURBED, str(tmp_path_factory.mktemp("hrm_text1_perturbed") / "model"))
  config, module, params, _ = modeldir.load_model_dir(path)
  return config, module, jax.tree.map(jnp.asarray, params)


def test_early_exit_on_the_perturbed_fixture_equals_the_loop_and_the_original(perturbed):
  """Layer 0's halt head saturates: its remainder is below eps after 2 of its 4 halt reads, so it stops after 1
  block-pair update (the original's counter says 2: the exit step is counted), while layer 1 reads all 4 (3
  updates). The scan equals the literal loop (logits 3e-7 of the largest) and the original's record: logits
  (measured 5.6e-6 of the largest, ~199), halt probabilities (4.3e-5; NaN in the original's where a layer had
  stopped, 0 in jaxlm's) and loss with the original's 'count' ponder term, 2 + 3 per token."""
  config, module, params = perturbed
  assert (config.ponder_loss, config.exit_over_padding, config.halt_max_steps) == ("count", True, 4)
  ids = np.load(os.path.join(PERTURBED, "input_ids.npy"))
  assert assert_matches_loop(config, module, params, ids) == [2, 3]
  out = ponder(module, params, ids)
  want = np.load(os.path.join(PERTURBED, "logits.npy"))
  err, scale = float(np.abs(np.asarray(out["logits"]) - want).max()), float(np.abs(want).max())
  print(f"\nhrm_text1 perturbed fixture: logits max abs err {err:.3g} (largest {scale:.1f}, relative {err / scale:.2g})")
  assert err <= 1.5e-5 * scale
  probs, got = np.load(os.path.join(PERTURBED, "halt_probs.npy")), np.asarray(out["halt_probs"])
  stopped = np.isnan(probs)
  np.testing.assert_array_equal(stopped.all(axis=(2, 3)), [[False, False, True, True], [False] * 4])
  np.testing.assert_array_equal(got[stopped], 0.0)
  np.testing.assert_allclose(got[~stopped], probs[~stopped], rtol=0, atol=1e-4)
  targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
  weights = np.ones(ids.shape, np.float32)
  weights[:, -1] = 0.0
  total, weight, sums = jax.jit(lambda p, b: module.apply({"params": p}, b, method="loss"))(
      params, {"inputs": ids, "targets": targets, "weights": weights})
  loss = float(np.load(os.path.join(PERTURBED, "loss.npy")))
  assert abs(float(total / weight) - loss) <= 1e-5 * loss
  assert float(sums["ponder"] / weight) == 2 + 3



def _halting(params, layer, bias, kernel_scale=0.0, seed=0):
  """params with layer `layer`'s halt head set to `bias` and a random kernel of the given scale."""
  head = dict(params["layers"]["halt_head"])
  head["bias"] = head["bias"].at[layer].set(bias)
  noise = kernel_scale * jax.random.normal(jax.random.key(seed), head["kernel"].shape[1:])
  head["kernel"] = head["kernel"].at[layer].set(noise)
  return {**params, "layers": {**params["layers"], "halt_head": head}}


def test_early_exit_equals_the_original_loop():
  """No exit on a random model; then a halt bias of +30 clamps p to 1 - 1e-6, so rem is ~1e-6 after one read
  and < eps after two: layer 0 stops after 2 of its 3 updates, layer 1 (bias -2.2) still runs all of them."""
  config, module, params = small_model(seed=1)
  assert assert_matches_loop(config, module, params, tokens(2)) == [3, 3]
  assert assert_matches_loop(config, module, _halting(params, 0, 30.0), tokens(2)) == [2, 3]


def test_early_exit_over_padding_flag():
  """Layer 0: p = 1 - 1e-6 at its first read (z_H = 0), then a random kernel makes the second read halt some
  positions and not others. With the positions that do not halt all in the padding, jaxlm's default exits after
  two updates; the original's global `all` (exit_over_padding=True) waits for them. Both equal the loop."""
  config, module, params = small_model(seed=2)
  params = _halting(params, 0, 30.0, kernel_scale=3.0, seed=5)
  ids = tokens(4)
  second_read = np.asarray(ponder(module, params, ids)["halt_probs"][0, 1])
  blocking = second_read < 0.5
  assert blocking.any() and not blocking.all()
  # Causal attention: padding the tail (from the first blocking position on) leaves earlier positions alone.
  first = int(np.argmax(blocking.any(axis=0)))
  mask = np.ones(ids.shape, bool)
  mask[:, first:] = False
  assert mask.any() and not blocking[mask].any()
  assert assert_matches_loop(config, module, params, ids, mask) == [2, 3]
  original = dataclasses.replace(config, exit_over_padding=True)
  assert assert_matches_loop(original, HRMText1(original), params, ids, mask) == [3, 3]


# ------------------------------------------------------------------------------------- gradients, loss
def _batch(ids, weights=None):
  return {"inputs": jnp.asarray(ids), "targets": jnp.asarray(np.roll(ids, -1, axis=1)),
          "weights": jnp.ones(ids.shape, jnp.float32) if weights is None else jnp.asarray(weights)}


def test_gradients_flow_through_every_step_as_in_the_loop():
  """d loss / d params of the scanned model equals that of the literal loop (full backprop through every step,
  a layer's early exit included), and every layer's blocks and halt head get gradient."""
  config, _, params = small_model(seed=4)
  params = _halting(params, 0, 30.0)  # layer 0 exits early: the masked steps must pass no gradient
  ids = tokens(6)
  batch = _batch(ids)
  ran = loop_forward(config, params, ids)[2]
  assert ran == [2, 4]

  @jax.jit
  def loop_grad(p):
    def objective(p):
      logits, _, _, expected = loop_forward(config, p, ids, steps=ran)
      logp = jax.nn.log_softmax(logits)
      xent = -jnp.sum(jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1))
      return xent + config.ponder_loss_weight * jnp.sum(expected)
    return jax.grad(objective)(p)

  _, g_scan = _loss_fn(config)(params, batch)
  g_loop = loop_grad(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_scan), jax.tree.leaves(g_loop)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * float(np.abs(b).max()) + 1e-7,
                               err_msg=jax.tree_util.keystr(path))
  for block in ("H_module", "L_module"):
    kernel = g_scan["layers"][block]["mlp"]["wo"]["kernel"]
    assert all(float(jnp.abs(kernel[i]).max()) > 0 for i in range(config.n_layers)), block
  assert float(jnp.abs(g_scan["layers"]["halt_head"]["kernel"][1]).max()) > 0


def test_ponder_terms():
  """'expected' charges sum_s rem_s per weighted token, differentiable: the halt biases get gradient from it.
  (The original's 'count' is checked on the fixture: 2 layers x 3 updates per token.)"""
  config, module, params = small_model(seed=5)
  ids = tokens(7)
  weights = np.ones(ids.shape, np.float32)
  weights[1, 15:] = 0.0  # padding: no cross-entropy, no ponder cost
  (total, weight, sums), grads = _loss_fn(config)(params, _batch(ids, weights))
  expected = np.asarray(ponder(module, params, ids)["expected_updates"])
  np.testing.assert_allclose(float(sums["ponder"]), float(np.sum(expected * weights)), rtol=1e-5)
  np.testing.assert_allclose(float(total), float(sums["xent"] + 0.01 * sums["ponder"]), rtol=1e-6)
  assert float(weight) == weights.sum()
  # rem after k reads is prod(1 - p) < 1: the expected count is below the 2 layers x 3 updates run
  assert 0 < float(sums["ponder"]) / float(weight) < 6
  assert float(jnp.abs(grads["layers"]["halt_head"]["bias"]).min()) > 0


def test_dropout_needs_a_key_and_changes_the_output():
  config, module, params = small_model(seed=6)
  ids = tokens(8)
  run = jax.jit(lambda p, r: module.apply({"params": p}, ids, deterministic=False, rngs={"dropout": r}))
  a = np.asarray(run(params, jax.random.key(0)))
  assert not np.allclose(a, np.asarray(run(params, jax.random.key(1))))
  np.testing.assert_array_equal(np.asarray(run(params, jax.random.key(0))), a)
  assert not np.allclose(a, np.asarray(ponder(module, params, ids)["logits"]))


# ------------------------------------------------------------------------------------- causality, padding
def test_causal_by_gradient():
  """d logits[0, t] / d (embedded input at s) is zero for every s > t and for the other batch row."""
  config, module, params = small_model(seed=7)
  ids = jnp.asarray(tokens(9))
  t = 9

  def at_t(delta):
    def add_delta(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
        out = out + delta
      return out
    with nn.intercept_methods(add_delta):
      return jnp.sum(module.apply({"params": params}, ids)[0, t])

  g = np.asarray(jax.jit(jax.grad(at_t))(jnp.zeros(ids.shape + (config.d_model,))))
  assert not g[0, t + 1:].any() and not g[1].any()
  assert all(np.abs(g[0, s]).max() > 0 for s in range(t + 1))


def test_padding_mask_hides_padded_tokens():
  config, module, params = small_model(seed=8)
  ids = tokens(10)
  mask = np.ones(ids.shape, bool)
  mask[0, 17:] = False
  other = ids.copy()
  other[0, 17:] = (ids[0, 17:] + 11) % config.vocab_size  # different ids under the padding
  a = np.asarray(ponder(module, params, ids, mask)["logits"])
  b = np.asarray(ponder(module, params, other, mask)["logits"])
  np.testing.assert_array_equal(a[0, :17], b[0, :17])
  np.testing.assert_array_equal(a[1], b[1])
  unpadded = np.asarray(ponder(module, params, ids)["logits"])
  np.testing.assert_allclose(a[0, :17], unpadded[0, :17], atol=1e-5 * np.abs(a).max())
  # weights mask the loss: positions whose target is padding, and the padding, change nothing
  w = (mask & np.roll(mask, -1, axis=1)).astype(np.float32)
  (la, _, _), _ = _loss_fn(config)(params, _batch(ids, w))
  (lb, _, _), _ = _loss_fn(config)(params, _batch(other, w))
  np.testing.assert_allclose(float(la), float(lb), rtol=1e-6)


# ------------------------------------------------------------------------------------- structure
def _primitives(jaxpr, counts=None):
  """Primitives of a jaxpr by name, those of nested jaxprs (scan bodies, remat, custom rules) included."""
  counts = collections.Counter() if counts is None else counts
  for eqn in jaxpr.eqns:
    counts[eqn.primitive.name] += 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          _primitives(sub.jaxpr, counts)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          _primitives(sub, counts)
  return counts


def test_program_size_does_not_grow_with_layers_or_steps():
  """nn.scan over layers and a scan over pondering steps: the traced forward and training gradient have the same
  primitives, nested bodies included, for 2 layers x 3 halt reads and 6 x 8 (only scan lengths and stacked
  parameter shapes differ), with the two scans nested. A Python loop over layers or steps would multiply them."""
  def program(**changes):
    module = HRMText1(HRMText1Config.from_dict({**SMALL, **changes}))
    tok = jnp.zeros((1, 8), jnp.int32)
    batch = {"inputs": tok, "targets": tok, "weights": jnp.ones((1, 8))}
    params = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), tok)["params"]))
    forward = jax.make_jaxpr(lambda p: module.apply({"params": p}, tok))(params)
    grad = jax.make_jaxpr(jax.grad(lambda p: module.apply({"params": p}, batch, method="loss")[0]))(params)
    return _primitives(forward.jaxpr), _primitives(grad.jaxpr)
  (small_fwd, small_grad), (big_fwd, big_grad) = program(n_layers=2, halt_max_steps=3), program(n_layers=6, halt_max_steps=8)
  print(f"\nprimitives: forward {sum(small_fwd.values())}, gradient {sum(small_grad.values())}")
  assert small_fwd == big_fwd and small_grad == big_grad
  assert small_fwd["scan"] == 2 and small_grad["scan"] >= 4  # layers, steps (and their transposes)


def test_full_size_parameter_count():
  from jaxlm.config_defaults import load_config
  for variant in ("", ":original"):
    config = load_config(os.path.join(ROOT, "configs", "hrm_text1.py") + variant)
    _, module = build_model(config.model)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    padding = (32_128 - 32_100) * 512  # the table's rows up to a multiple of 128 (model.vocab_multiple)
    assert sum(x.size for x in jax.tree.leaves(nn.unbox(shapes["params"]))) == 117_129_740 + padding


def test_bad_configs_name_the_field():
  for change, message in [(dict(halt_max_steps=1), "model.halt_max_steps"),
                          (dict(ponder_loss="act"), "model.ponder_loss"),
                          (dict(n_heads=5), "model.n_heads"),
                          (dict(dropout=1.0), "model.dropout"),
                          (dict(causal=False), r"unknown model config field\(s\) \['causal'\]")]:
    with pytest.raises(ValueError, match=message):
      build_model({"arch": "hrm_text1", **SMALL, **change})
