"""Attention implementations equal the reference on every mask kind; the chunked paths keep memory bounded.

Reference: attention.explicit_attention on the dense mask (softmax written out). Tolerances: float32 rounding of
a different summation order, measured <= 6e-7 on outputs of magnitude ~1 and <= 2e-6 on gradients; asserted 1e-5.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models import attention, decoder, losses

TOL = 1e-5


def _qkv(b, t, s, n, k, h, seed=0):
  rq, rk, rv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(rq, (b, t, n, h)), jax.random.normal(rk, (b, s, k, h)),
          jax.random.normal(rv, (b, s, k, h)))


def _positions(b, length, offset=0):
  return jnp.broadcast_to(jnp.arange(offset, offset + length, dtype=jnp.int32), (b, length))


def _rows_with_keys(spec):
  """Query rows that may attend to at least one key (fully masked rows are padding, defined differently)."""
  return np.asarray(spec.dense()[:, 0].any(-1))  # [B, T]


MASKS = {
    # name: (T, S, causal, window, padded keys, segments, query offset)
    "causal": (37, 37, True, None, False, False, 0),
    "causal_window": (37, 37, True, 5, False, False, 0),
    "yinggem_noncausal_window": (37, 37, False, 6, False, False, 0),
    "full_bidirectional": (21, 21, False, None, False, False, 0),
    "left_padding": (29, 29, True, None, True, False, 0),
    "segments": (33, 33, True, None, False, True, 0),
    "queries_after_a_prefix": (9, 40, True, 7, False, False, 31),
}


def _spec(name, b):
  t, s, causal, window, padded, segmented, offset = MASKS[name]
  k_valid = q_seg = k_seg = None
  if padded:
    k_valid = jnp.arange(s)[None, :] >= jnp.array([[0], [4]])  # row 1: four left-padding keys
  if segmented:
    seg = (jnp.arange(s)[None, :] >= jnp.array([[11], [20]])).astype(jnp.int32)  # two documents per row
    q_seg, k_seg = seg[:, :t], seg
  return attention.MaskSpec(_positions(b, t, offset), _positions(b, s), k_valid, q_seg, k_seg, causal=causal,
                            window=window)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_chunked_equals_reference_values_and_gradients(name):
  b, n, k, h = 2, 4, 2, 8  # GQA: two query heads per kv head
  t, s = MASKS[name][:2]
  q, kk, v = _qkv(b, t, s, n, k, h)
  spec = _spec(name, b)
  rows = _rows_with_keys(spec)
  cotangent = jax.random.normal(jax.random.key(9), (b, t, n, h)) * rows[:, :, None, None]

  def reference(q, kk, v):
    return attention.explicit_attention(q, kk, v, spec.dense())

  def chunked(q, kk, v):
    return attention.chunked_attention(q, kk, v, spec, block_q=8, block_k=16)  # blocks that do not divide T, S

  want, want_vjp = jax.vjp(reference, q, kk, v)
  got, got_vjp = jax.vjp(chunked, q, kk, v)
  np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=TOL)
  for g_got, g_want in zip(got_vjp(cotangent), want_vjp(cotangent)):
    np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), atol=TOL)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_dense_equals_reference_values_and_gradients(name):
  """The xla path's softmax with its backward written out (attention.dense_attention) against autodiff of the
  reference, every row included (fully masked rows average every value in both)."""
  b, n, k, h = 2, 4, 2, 8
  t, s = MASKS[name][:2]
  q, kk, v = _qkv(b, t, s, n, k, h, seed=3)
  mask = _spec(name, b).dense()
  cotangent = jax.random.normal(jax.random.key(8), (b, t, n, h))
  want, want_vjp = jax.vjp(lambda *x: attention.explicit_attention(*x, mask), q, kk, v)
  got, got_vjp = jax.vjp(jax.jit(lambda *x: attention.dense_attention(*x, mask)), q, kk, v)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL)
  for g_got, g_want in zip(got_vjp(cotangent), want_vjp(cotangent)):
    np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), atol=TOL)


def test_dense_attention_in_bfloat16_is_as_close_to_float32_as_the_reference():
  """In bfloat16 the written-out backward (rowsum(dO * O) from the rounded output) stays within 1.25x of the
  reference's own bfloat16 error against float32 (measured 0.52% against 0.48% relative on dq)."""
  b, t, n, k, h = 2, 64, 4, 2, 32
  q, kk, v = _qkv(b, t, t, n, k, h, seed=5)
  mask = _spec("causal", b).dense() if t == MASKS["causal"][0] else attention.attention_mask(
      _positions(b, t), _positions(b, t), causal=True, window=None)
  cotangent = jax.random.normal(jax.random.key(6), (b, t, n, h))

  def grads(fn, dtype):
    _, vjp = jax.vjp(lambda *x: fn(*x, mask), *(x.astype(dtype) for x in (q, kk, v)))
    return [np.asarray(g.astype(jnp.float32)) for g in vjp(cotangent.astype(dtype))]

  exact = grads(attention.explicit_attention, jnp.float32)
  for got, ref, want in zip(grads(attention.dense_attention, jnp.bfloat16),
                            grads(attention.explicit_attention, jnp.bfloat16), exact):
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 0 < error <= 1.25 * np.linalg.norm(ref - want) / np.linalg.norm(want) + 1e-3


def test_chunked_attention_dropout_equals_the_reference_with_the_same_keep_mask():
  b, t, n, k, h, block, rate = 2, 24, 4, 2, 8, 8, 0.3
  q, kk, v = _qkv(b, t, t, n, k, h, seed=3)
  spec = attention.MaskSpec(_positions(b, t), _positions(b, t), causal=True, window=None)
  rng = jax.random.key(5)
  tiles = t // block
  keep_rows = [jnp.concatenate([attention.block_dropout_keep(rng, qi, ki, rate, (b, k, n // k, block, block))
                                for ki in range(tiles)], axis=-1) for qi in range(tiles)]
  keep = jnp.concatenate(keep_rows, axis=-2)  # [B, K, G, T, S]
  assert 0.6 < float(keep.mean()) < 0.8

  def reference(q, kk, v):
    return attention.explicit_attention(q, kk, v, spec.dense(), dropout_rate=rate, keep_BxKxGxTxS=keep)

  def chunked(q, kk, v):
    return attention.chunked_attention(q, kk, v, spec, block_q=block, block_k=block, dropout_rate=rate,
                                       dropout_rng=rng)

  want, want_vjp = jax.vjp(reference, q, kk, v)
  got, got_vjp = jax.vjp(chunked, q, kk, v)
  np.testing.assert_allclose(got, want, atol=TOL)
  cotangent = jnp.ones_like(want)
  for g_got, g_want in zip(got_vjp(cotangent), want_vjp(cotangent)):
    np.testing.assert_allclose(g_got, g_want, atol=TOL)
  no_dropout = attention.chunked_attention(q, kk, v, spec, block_q=block, block_k=block)
  assert float(jnp.abs(got - no_dropout).max()) > 0.1


@pytest.mark.parametrize("window", [None, 4])
def test_cudnn_flags_express_the_same_mask(window):
  """The cuDNN call's is_causal / local_window_size translation, run through XLA (no GPU needed)."""
  b, t, n, k, h = 2, 19, 4, 1, 8
  q, kk, v = _qkv(b, t, t, n, k, h, seed=1)
  spec = attention.MaskSpec(_positions(b, t), _positions(b, t), causal=True, window=window, arange_positions=True)
  want = attention.explicit_attention(q, kk, v, spec.dense())
  got = attention.cudnn_attention(q, kk, v, spec, implementation="xla")
  np.testing.assert_allclose(got, want, atol=TOL)
  padded = dataclasses.replace(spec, k_valid_BxS=jnp.ones((b, t), bool))
  assert attention.cudnn_window(padded) is None  # padding is not expressible by the flags
  assert attention.cudnn_window(dataclasses.replace(spec, causal=False)) is None


def test_auto_chooses_by_backend_length_and_case():
  pick = lambda **kw: attention.resolve_impl("auto", **{**dict(q_len=1024, k_len=1024, dtype=jnp.bfloat16,
                                                             spec_is_plain=True, dropout=False, backend="gpu"), **kw})
  assert pick() == "cudnn"
  assert pick(dropout=True) == "chunked"
  assert pick(dtype=jnp.float32) == "chunked"
  assert pick(spec_is_plain=False) == "chunked"
  assert pick(backend="cpu") == "chunked"
  assert pick(backend="tpu", q_len=64, k_len=64) == "xla"
  assert attention.resolve_impl("xla", q_len=4096, k_len=4096, dtype=jnp.float32, spec_is_plain=True,
                                dropout=False) == "xla"
  with pytest.raises(ValueError, match="model.attention_impl"):
    attention.resolve_impl("flash", q_len=1, k_len=1, dtype=jnp.float32, spec_is_plain=True, dropout=False)


def _temp_bytes(fn, *args) -> int:
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_attention_backward_never_holds_a_whole_score_matrix():
  """Compiled temporary memory of value_and_grad: the xla path holds [B, N, T, S] scores (and probabilities);
  the chunked path, while it differentiates one query block, that block's scores against every key
  ([B, N, block, S], measured 2.6 such tiles for T=2048, block 256)."""
  b, t, n, h, block = 1, 2048, 4, 16, 256
  q, kk, v = _qkv(b, t, t, n, n, h)
  spec = attention.MaskSpec(_positions(b, t), _positions(b, t), causal=True, window=None)
  score_bytes = b * n * t * t * 4
  tile_bytes = b * n * block * t * 4

  def loss(impl):
    def f(q, kk, v):
      if impl == "xla":
        out = attention.explicit_attention(q, kk, v, spec.dense())
      else:
        out = attention.chunked_attention(q, kk, v, spec, block_q=block, block_k=block)
      return jnp.sum(out ** 2)
    return jax.value_and_grad(f, argnums=(0, 1, 2))

  dense, chunked = _temp_bytes(loss("xla"), q, kk, v), _temp_bytes(loss("chunked"), q, kk, v)
  print(f"\ntemporary bytes, T={t}: xla {dense / 2**20:.1f} MiB, chunked {chunked / 2**20:.1f} MiB "
        f"(one score matrix {score_bytes / 2**20:.1f} MiB)")
  assert dense >= score_bytes
  assert chunked <= 4 * tile_bytes == score_bytes / 2


def test_chunked_cross_entropy_equals_the_whole_one_and_bounds_memory():
  b, t, d, vocab = 2, 50, 16, 300
  rh, rw, rt = jax.random.split(jax.random.key(0), 3)
  hidden = jax.random.normal(rh, (b, t, d))
  kernel = jax.random.normal(rw, (d, vocab)) * 0.3
  targets = jax.random.randint(rt, (b, t), 0, vocab)
  weights = (jnp.arange(t) < 45).astype(jnp.float32)[None].repeat(b, 0)

  def loss(chunk):
    return lambda hidden, kernel: losses.chunked_xent(hidden, lambda x: x @ kernel, targets, weights, chunk=chunk)

  whole, whole_grads = jax.value_and_grad(lambda *a: loss(t)(*a)[0], argnums=(0, 1))(hidden, kernel)
  chunked, chunked_grads = jax.value_and_grad(lambda *a: loss(8)(*a)[0], argnums=(0, 1))(hidden, kernel)
  assert float(loss(8)(hidden, kernel)[1]) == float(weights.sum())
  np.testing.assert_allclose(chunked, whole, rtol=1e-6)
  for got, want in zip(chunked_grads, whole_grads):
    np.testing.assert_allclose(got, want, atol=1e-6)

  big_t, big_v = 1024, 8192
  hidden, kernel = jnp.zeros((b, big_t, d)), jnp.zeros((d, big_v))
  targets, weights = jnp.zeros((b, big_t), jnp.int32), jnp.ones((b, big_t))
  logits_bytes = b * big_t * big_v * 4

  def grad_of(chunk):
    return jax.grad(lambda hh, kk: losses.chunked_xent(hh, lambda x: x @ kk, targets, weights, chunk=chunk)[0],
                    argnums=(0, 1))

  assert _temp_bytes(grad_of(big_t), hidden, kernel) >= logits_bytes
  assert _temp_bytes(grad_of(64), hidden, kernel) <= logits_bytes / 4
  assert losses.auto_xent_chunk(8, 1024, 50257) == 64 and losses.auto_xent_chunk(12, 64, 65) == 64


@pytest.mark.parametrize("window,causal", [(6, True), (6, False)])
def test_decoder_implementations_agree(window, causal):
  """The whole model: logits and the training loss's gradients equal between the xla and chunked attention
  (and the whole vs chunked loss), GQA and biases included."""
  config = decoder.DecoderConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                                 attn_bias=True, head_bias=True, causal=causal, attention_window=window,
                                 attention_impl="xla", xent_chunk=1000)
  tokens = jax.random.randint(jax.random.key(0), (2, 30), 0, 97)
  reference = decoder.Decoder(config)
  params = jax.jit(reference.init)(jax.random.key(1), tokens)["params"]
  other = decoder.Decoder(dataclasses.replace(config, attention_impl="chunked", attention_block=8, xent_chunk=7))
  logits = lambda m: jax.jit(m.apply)({"params": params}, tokens)  # jitted: compiled once, not run op by op
  np.testing.assert_allclose(logits(other), logits(reference), atol=TOL)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "weights": jnp.ones(tokens.shape)}
  grad = lambda m: jax.jit(jax.grad(lambda p: m.apply({"params": p}, batch, method="loss")[0]))(params)
  for got, want in zip(jax.tree.leaves(grad(other)), jax.tree.leaves(grad(reference))):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-5)


SPLASH_LENGTH = 256  # two of the kernel's 128-token blocks


@pytest.mark.parametrize("name", [m for m in sorted(MASKS) if MASKS[m][6] == 0])
def test_splash_equals_reference_values_and_gradients(name):
  """The Pallas splash kernel (run by Pallas' interpreter off TPU) on each mask it supports, GQA included: the
  same values and gradients as the reference. Its mask objects and segment ids are what runs on a TPU."""
  _, _, causal, window, padded, segmented, _ = MASKS[name]
  b, n, k, h, t = 2, 4, 2, 8, SPLASH_LENGTH
  q, kk, v = _qkv(b, t, t, n, k, h)
  k_valid = q_seg = k_seg = None
  if padded:
    k_valid = jnp.arange(t)[None, :] >= jnp.array([[0], [4]])
  if segmented:
    q_seg = k_seg = (jnp.arange(t)[None, :] >= jnp.array([[11], [150]])).astype(jnp.int32)
  spec = attention.MaskSpec(_positions(b, t), _positions(b, t), k_valid, q_seg, k_seg, causal=causal,
                            window=window, arange_positions=True)
  assert attention.splash.unsupported(spec, t, t, False, 128) is None
  rows = _rows_with_keys(spec)
  cotangent = jax.random.normal(jax.random.key(9), (b, t, n, h)) * rows[:, :, None, None]
  want, want_vjp = jax.vjp(lambda *x: attention.explicit_attention(*x, spec.dense()), q, kk, v)
  got, got_vjp = jax.vjp(lambda *x: attention.attend(*x, spec, impl="splash", block_q=128), q, kk, v)
  np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=TOL)
  for g_got, g_want in zip(got_vjp(cotangent), want_vjp(cotangent)):
    np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), atol=TOL)


def test_splash_refuses_what_it_cannot_compute_and_auto_takes_it_only_on_tpu():
  spec = _spec("queries_after_a_prefix", 2)
  q, kk, v = _qkv(2, 9, 40, 4, 2, 8)
  with pytest.raises(ValueError, match=r"attention_impl='splash' cannot compute positions other than 0\.\.T-1"):
    attention.attend(q, kk, v, spec, impl="splash")
  plain = attention.MaskSpec(_positions(1, 256), _positions(1, 256), arange_positions=True)
  assert "dropout" in attention.splash.unsupported(plain, 256, 256, True, 128)
  assert "multiple of the block size 128" in attention.splash.unsupported(plain, 200, 200, False, 128)
  stacked = plain.replace(layer_window=jnp.int32(4))
  assert "per-layer windows" in attention.splash.unsupported(stacked, 256, 256, False, 128)
  pick = lambda **kw: attention.resolve_impl("auto", **{**dict(q_len=1024, k_len=1024, dtype=jnp.bfloat16,
                                                             spec_is_plain=False, dropout=False), **kw})
  assert pick(backend="tpu", splash_fits=True) == "splash"
  assert pick(backend="tpu", splash_fits=False) == "chunked"
  assert pick(backend="gpu", splash_fits=True) == "chunked"
