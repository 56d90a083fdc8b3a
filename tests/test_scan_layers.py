"""model.scan_layers: one nn.scan over the blocks equals the per-block loop; the layouts convert exactly both ways;
the compiled program does not grow with depth."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models import decoder, layout

BASE = decoder.DecoderConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64,
                             attn_bias=True, head_bias=True)


@pytest.mark.parametrize("windows,policy,impl", [((0, 5, 3), "full", "chunked"), ((4, 4, 4), "dots", "xla")])
def test_scanned_stack_equals_the_per_block_loop(windows, policy, impl):
  config = dataclasses.replace(BASE, attention_window=windows, remat_policy=policy, attention_impl=impl,
                               attention_block=8)
  scanned = decoder.Decoder(dataclasses.replace(config, scan_layers=True))
  looped = decoder.Decoder(config)
  tokens = jax.random.randint(jax.random.key(0), (2, 20), 0, 97)
  stacked = nn.unbox(jax.jit(scanned.init)(jax.random.key(1), tokens)["params"])
  assert stacked["layers"]["block"]["attn"]["query"]["kernel"].shape == (3, 32, 4, 8)
  per_block = layout.unstack_layers(stacked, 3)
  assert sorted(k for k in per_block if k.startswith("layers")) == ["layers_0", "layers_1", "layers_2"]
  logits = lambda m, p: jax.jit(m.apply)({"params": p}, tokens)  # jitted: compiled once, not run op by op
  np.testing.assert_allclose(logits(scanned, stacked), logits(looped, per_block), atol=1e-6)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "weights": jnp.ones(tokens.shape)}
  grad = lambda m, p: jax.jit(jax.grad(lambda p: m.apply({"params": p}, batch, method="loss")[0]))(p)
  g_scanned = layout.unstack_layers(grad(scanned, stacked), 3)
  g_looped = grad(looped, per_block)
  for got, want in zip(jax.tree.leaves(g_scanned), jax.tree.leaves(g_looped)):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  # Layout round trip is exact.
  for a, b in zip(jax.tree.leaves(layout.stack_layers(per_block, 3)), jax.tree.leaves(stacked)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_unrolled_scan_equals_the_loop_without_a_loop():
  """model.scan_unroll >= n_layers: the same stacked parameters and values as the scan's loop (scan_unroll=1), and
  the lowered gradient program has no while loop left (with scan_unroll=1 it has one)."""
  config = dataclasses.replace(BASE, attention_window=(0, 5, 3), attention_impl="xla", scan_layers=True,
                               xent_chunk=10 ** 6)
  looped = decoder.Decoder(config)
  unrolled = decoder.Decoder(dataclasses.replace(config, scan_unroll=8))
  tokens = jax.random.randint(jax.random.key(0), (2, 20), 0, 97)
  params = nn.unbox(jax.jit(looped.init)(jax.random.key(1), tokens)["params"])
  same_init = nn.unbox(jax.jit(unrolled.init)(jax.random.key(1), tokens)["params"])
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same_init)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "weights": jnp.ones(tokens.shape)}
  grad_fn = lambda m: jax.jit(jax.value_and_grad(lambda p: m.apply({"params": p}, batch, method="loss")[0]))
  (loss_loop, g_loop), (loss_unrolled, g_unrolled) = grad_fn(looped)(params), grad_fn(unrolled)(params)
  np.testing.assert_allclose(loss_unrolled, loss_loop, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(g_unrolled), jax.tree.leaves(g_loop)):
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
  assert "stablehlo.while" in grad_fn(looped).lower(params).as_text()
  assert "stablehlo.while" not in grad_fn(unrolled).lower(params).as_text()


def test_cached_decoding_refuses_the_stacked_layout():
  scanned = decoder.Decoder(dataclasses.replace(BASE, scan_layers=True))
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = scanned.init(jax.random.key(1), tokens)["params"]
  with pytest.raises(ValueError, match="unstack"):
    scanned.apply({"params": params}, tokens, positions_BxT=jnp.zeros((1, 4), jnp.int32), cache=[None] * 3)


def _program_size(n_layers: int, scan: bool) -> int:
  config = dataclasses.replace(BASE, n_layers=n_layers, scan_layers=scan)
  module = decoder.Decoder(config)
  tokens = jnp.zeros((2, 16), jnp.int32)
  params = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), tokens)["params"]))
  batch = {"inputs": tokens, "targets": tokens, "weights": jnp.ones((2, 16))}
  grad = jax.jit(jax.grad(lambda p: module.apply({"params": p}, batch, method="loss")[0]))
  return len(grad.lower(params).as_text())


def test_scanned_program_does_not_grow_with_depth():
  """The lowered train-gradient program: a fixed size with scan_layers (the body is written once), growing with
  every block without it."""
  scanned = [_program_size(n, True) for n in (2, 8)]
  looped = [_program_size(n, False) for n in (2, 8)]
  assert scanned[1] <= 1.02 * scanned[0], scanned
  assert looped[1] >= 2.5 * looped[0], looped


def test_a_scanned_training_run_exports_and_converts_back_exactly(tmp_path):
  """Train with scan_layers (the end-of-run sample decodes through the per-block layout), then: every tool loads
  the per-block layout, equal to slicing the checkpoint's stacked arrays; jax2torch from the workdir and torch2jax
  back give those values bit for bit; stacking them again gives the checkpoint's arrays."""
  import os

  from convert import api
  from jaxlm import modeldir, trainer
  from jaxlm.checkpoint import restore_for_inference
  from jaxlm.config_defaults import load_config

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = load_config(os.path.join(root, "configs", "yinggem.py:tiny"))
  config.model.update(d_model=32, n_layers=2, n_heads=2, d_ff=64, attention_window=16, max_seq_len=16,
                      scan_layers=True)
  config.data.update(eval_batches=1)
  config.train.update(steps=2, batch_size=4, seq_len=16, eval_every=2, save_every=2, log_every=1,
                      sample_tokens=4, progress=False)
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  model_dict, stacked, _ = restore_for_inference(workdir)
  loaded = modeldir.load(workdir)
  assert model_dict["scan_layers"] and not loaded.model_dict["scan_layers"]
  expected = layout.unstack_layers(stacked, 2)
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(expected)):
    assert np.array_equal(a, b)
  exported = api.jax2torch(workdir, str(tmp_path / "yg.pth"), family="yinggem", allow_different_computation=True)
  back = modeldir.load(api.torch2jax(exported, str(tmp_path / "back"), family="yinggem"))
  for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(expected)):
    assert np.array_equal(a, b)
  for a, b in zip(jax.tree.leaves(layout.stack_layers(back.params, 2)), jax.tree.leaves(stacked)):
    assert np.array_equal(a, b)
