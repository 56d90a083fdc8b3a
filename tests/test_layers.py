"""Layer invariants: causality by gradient, GQA = MHA with repeated kv heads, mask definitions, RoPE."""
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models import build_model, layers

ATOL = 1e-5


def _attention(num_heads=4, num_kv_heads=2, head_dim=8, **kw):
  return layers.Attention(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, **kw)


def _positions(b, t):
  return jnp.broadcast_to(jnp.arange(t), (b, t))


def _jacobian_blocks(module, params, x_1xTxD, mask):
  """|d out[t] / d x[s]| summed over features: a [T, S] dependency map."""
  t = x_1xTxD.shape[1]
  f = lambda x: module.apply(params, x, _positions(1, t), mask)[0]
  jac = jax.jacrev(f)(x_1xTxD)  # [T, D, 1, S, D]
  return np.abs(np.asarray(jac)).sum(axis=(1, 2, 4))


def test_causal_attention_gradient_never_reaches_the_future():
  t, d = 10, 16
  attn = _attention()
  x = jax.random.normal(jax.random.key(0), (1, t, d))
  mask = layers.attention_mask(_positions(1, t), _positions(1, t), causal=True, window=None)
  params = attn.init(jax.random.key(1), x, _positions(1, t), mask)
  dep = _jacobian_blocks(attn, params, x, mask)
  future = np.triu(np.ones((t, t), bool), k=1)
  assert np.all(dep[future] == 0.0)
  assert np.all(dep[~future] > 0.0)  # and every past key does matter


def test_decoder_causality_by_gradient_through_embeddings():
  cfg, model = build_model(dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32))
  tokens = jnp.arange(8)[None] % 32
  params = nn.unbox(model.init(jax.random.key(0), tokens))["params"]

  def logits_at(embedding, t):
    p = dict(params, embed={"embedding": embedding})
    return model.apply({"params": p}, tokens)[0, t].sum()

  emb = params["embed"]["embedding"]
  for t in range(8):
    g = jax.grad(logits_at)(emb, t)
    touched = np.nonzero(np.abs(np.asarray(g)).sum(-1))[0]
    assert set(touched.tolist()) <= set(np.asarray(tokens[0, : t + 1]).tolist())


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window_dependency_matches_the_mask_definition(causal):
  t, d, w = 12, 16, 4
  attn = _attention()
  x = jax.random.normal(jax.random.key(0), (1, t, d))
  mask = layers.attention_mask(_positions(1, t), _positions(1, t), causal=causal, window=w)
  params = attn.init(jax.random.key(1), x, _positions(1, t), mask)
  dep = _jacobian_blocks(attn, params, x, mask) > 0
  i, j = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
  expected = (j >= i - w + 1) & ((j <= i) if causal else True)
  np.testing.assert_array_equal(dep, expected)


def test_attention_mask_padding_and_offsets():
  q = jnp.array([[5, 6]])
  k = jnp.array([[3, 4, 5, 6]])
  valid = jnp.array([[False, True, True, True]])
  m = np.asarray(layers.attention_mask(q, k, causal=True, window=3, k_valid_BxS=valid))[0, 0]
  # query at 5 sees keys 3..5 minus padded key 3; query at 6 sees 4..6.
  np.testing.assert_array_equal(m, [[False, True, True, False], [False, True, True, True]])


def test_gqa_equals_mha_with_repeated_kv_heads():
  b, t, d, n, k, h = 2, 7, 24, 6, 2, 8
  x = jax.random.normal(jax.random.key(0), (b, t, d))
  mask = layers.attention_mask(_positions(b, t), _positions(b, t), causal=True, window=None)
  gqa = _attention(n, k, h, qkv_bias=True, out_bias=True)
  p = nn.unbox(gqa.init(jax.random.key(1), x, _positions(b, t), mask))
  mha = _attention(n, n, h, qkv_bias=True, out_bias=True)
  rep = lambda a: jnp.repeat(a, n // k, axis=-2)  # query head i uses kv head i // (n/k)
  pm = jax.tree.map(lambda a: a, p)
  for name in ("key", "value"):
    pm["params"][name] = {"kernel": rep(p["params"][name]["kernel"]), "bias": rep(p["params"][name]["bias"])}
  out_gqa = gqa.apply(p, x, _positions(b, t), mask)
  out_mha = mha.apply(pm, x, _positions(b, t), mask)
  np.testing.assert_allclose(out_gqa, out_mha, atol=ATOL)


def test_fused_attention_equals_explicit_attention():
  b, t, n, k, h = 2, 9, 4, 2, 8
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (b, t, n, h))
  kk = jax.random.normal(ks[1], (b, t, k, h))
  v = jax.random.normal(ks[2], (b, t, k, h))
  valid = jnp.array([[True] * t, [True] * (t - 3) + [False] * 3])
  mask = layers.attention_mask(_positions(b, t), _positions(b, t), causal=True, window=4, k_valid_BxS=valid)
  fused = layers.dot_product_attention(q, kk, v, mask)
  explicit = layers.explicit_attention(q, kk, v, mask)
  np.testing.assert_allclose(fused, explicit, atol=ATOL)


def test_attention_dropout_is_active_only_in_training():
  t, d = 6, 16
  attn = _attention(dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(0), (1, t, d))
  mask = layers.attention_mask(_positions(1, t), _positions(1, t), causal=True, window=None)
  params = attn.init(jax.random.key(1), x, _positions(1, t), mask)
  a = attn.apply(params, x, _positions(1, t), mask)
  b = attn.apply(params, x, _positions(1, t), mask)
  c = attn.apply(params, x, _positions(1, t), mask, deterministic=False, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rope_scores_depend_only_on_relative_position(style):
  h = 16
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, h))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, h))
  score = lambda m, n: float(jnp.sum(layers.apply_rope(q, jnp.array([[m]]), 1e4, style) *
                                     layers.apply_rope(k, jnp.array([[n]]), 1e4, style)))
  for offset in (0, 3, 17, 250):
    assert score(5 + offset, 2 + offset) == pytest.approx(score(5, 2), abs=1e-4)
  assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)
  # position 0 is the identity, and the rotation keeps norms
  np.testing.assert_allclose(layers.apply_rope(q, jnp.array([[0]]), 1e4, style), q, atol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(layers.apply_rope(q, jnp.array([[7]]), 1e4, style)),
                             jnp.linalg.norm(q), rtol=1e-5)


def test_rope_styles_are_a_permutation_of_each_other():
  # interleaved pairs (2i, 2i+1) become rotate-half pairs (i, i + H/2) under a fixed permutation of features
  h, t = 8, 5
  x = jax.random.normal(jax.random.key(0), (1, t, 2, h))
  perm = np.concatenate([np.arange(0, h, 2), np.arange(1, h, 2)])
  pos = _positions(1, t)
  inter = layers.apply_rope(x, pos, 1e4, "interleaved")
  half = layers.apply_rope(x[..., perm], pos, 1e4, "half")
  np.testing.assert_allclose(inter[..., perm], half, atol=1e-6)


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rope_on_positions_0_to_t_is_a_table_of_the_program_with_the_same_values(style):
  """arange=True (what attention does for MaskSpec.arange_positions): the same rotation as computed from the
  positions, and the jitted program computes no cosine or sine (they are a constant table)."""
  x = jax.random.normal(jax.random.key(0), (3, 40, 2, 16))
  pos = _positions(3, 40)
  rope = lambda arange: jax.jit(lambda x, p: layers.apply_rope(x, p, 1e4, style, arange=arange))
  np.testing.assert_allclose(rope(True)(x, pos), rope(False)(x, pos), atol=1e-6, rtol=0)
  trig = lambda arange: len(re.findall(r"\b(cosine|sine)\(", rope(arange).lower(x, pos).compile().as_text()))
  assert trig(True) == 0 and trig(False) > 0


def test_norms_match_numpy():
  x = np.random.RandomState(0).randn(3, 5, 12).astype(np.float32)
  rms = layers.RMSNorm(eps=1e-6)
  p = rms.init(jax.random.key(0), x)
  expected = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(rms.apply(p, x), expected, atol=1e-6)
  ln = layers.LayerNorm(eps=1e-5)
  p = ln.init(jax.random.key(0), x)
  expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(ln.apply(p, x), expected, atol=1e-5)


@pytest.mark.parametrize("act,fn", [("silu", lambda g: g / (1 + np.exp(-g))),
                                    ("sigmoid", lambda g: 1 / (1 + np.exp(-g)))])
def test_gated_mlp_value_times_activated_gate(act, fn):
  x = np.random.RandomState(0).randn(2, 3, 8).astype(np.float32)
  mlp = layers.GatedMLP(hidden_dim=6, activation=act, use_bias=True)
  p = nn.unbox(mlp.init(jax.random.key(0), x))["params"]
  p["wi"]["bias"] = jnp.asarray(np.random.RandomState(1).randn(2, 6).astype(np.float32))
  wi, bi = np.asarray(p["wi"]["kernel"]), np.asarray(p["wi"]["bias"])
  value = x @ wi[:, 0] + bi[0]
  gate = x @ wi[:, 1] + bi[1]
  expected = (value * fn(gate)) @ np.asarray(p["wo"]["kernel"]) + np.asarray(p["wo"]["bias"])
  np.testing.assert_allclose(mlp.apply({"params": p}, x), expected, atol=1e-5)


def test_every_parameter_has_logical_axis_names():
  _, model = build_model(dict(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                              attn_bias=True, mlp_bias=True, head_bias=True, norm="layer"))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda l: isinstance(l, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(l, nn.LogicallyPartitioned) for l in leaves)
  assert all(len(l.names) == len(l.value.shape) for l in leaves)


def test_tied_embeddings_share_the_table():
  """One [V, D] table serves the input embedding and the output head: the params tree holds it once, a loss that
  reaches the table only through the head puts its gradient there, and the head's logits are x . table[v]."""
  v, hidden = 37, 16  # V appears in no other parameter's shape
  _, model = build_model(dict(vocab_size=v, d_model=hidden, n_layers=1, n_heads=2, d_ff=32, tie_embeddings=True))
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  assert [k for k, a in flat.items() if v in a.shape] == ["embed/embedding"] and "head" not in params
  assert flat["embed/embedding"].shape == (v, hidden)
  tokens = jnp.array([[1, 2, 3]])
  apply = jax.jit(lambda p: model.apply({"params": p}, tokens))
  logits = apply(params)
  assert logits.shape == (1, 3, v) and logits.dtype == jnp.float32

  # row 7 is no input token: only the head reads it, so its gradient (and logit 7) come from the head alone
  grads = jax.jit(jax.grad(lambda p: apply(p)[0, -1, 7]))(params)
  grad_table = np.asarray(grads["embed"]["embedding"])
  assert np.abs(grad_table[7]).sum() > 0
  assert np.all(grad_table[[i for i in range(v) if i not in (1, 2, 3, 7)]] == 0)
  # the head is x . table[v]: give row 7 the contents of row 5 and logit 7 becomes logit 5, nothing else moves
  table = params["embed"]["embedding"]
  swapped = apply(dict(params, embed={"embedding": table.at[7].set(table[5])}))
  np.testing.assert_allclose(swapped[..., 7], logits[..., 5], rtol=1e-6, atol=1e-6)
  others = [i for i in range(v) if i != 7]
  np.testing.assert_allclose(swapped[..., others], logits[..., others], rtol=1e-6, atol=1e-6)
