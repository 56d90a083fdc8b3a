"""FLOP counts behind tflops_per_device / mfu, checked against XLA's own count of the compiled program."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import flops
from jaxlm.models import decoder


def test_mean_keys_per_query_follows_the_mask():
  assert flops.mean_keys_per_query(4, True, 0) == (1 + 2 + 3 + 4) / 4
  assert flops.mean_keys_per_query(4, True, 2) == (1 + 2 + 2 + 2) / 4
  assert flops.mean_keys_per_query(4, False, 2) == (4 + 4 + 3 + 2) / 4  # YingGem: k > q - 2, the future included
  assert flops.mean_keys_per_query(4, False, 0) == 4


def test_decoder_training_flops_equal_the_compiled_programs_matmuls():
  """Non-causal, no window: the dense path computes every score, as the count assumes. XLA's count also has the
  elementwise work (softmax, norms, optimizer-free gradient), a few percent here."""
  config = decoder.DecoderConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384,
                                 causal=False, attention_impl="xla", xent_chunk=10 ** 6)
  b, t = 2, 64
  module = decoder.Decoder(config)
  tokens = jnp.zeros((b, t), jnp.int32)
  params = module.init(jax.random.key(0), tokens)["params"]
  batch = {"inputs": tokens, "targets": tokens, "weights": jnp.ones((b, t))}
  grad = jax.jit(jax.grad(lambda p: module.apply({"params": p}, batch, method="loss")[0]))
  cost = grad.lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  counted = flops.training_flops_per_token(config, t) * b * t
  print(f"\ncounted {counted:.4g} FLOPs, XLA {cost['flops']:.4g}")
  assert counted <= cost["flops"] <= 1.15 * counted


def test_peaks_by_device_kind():
  assert flops.peak_tflops("NVIDIA H200") == 989.0
  assert flops.peak_tflops("TPU v5 lite") == 197.0
  assert flops.peak_tflops("TPU v4") == 275.0
  assert flops.peak_tflops("cpu") is None


@pytest.mark.parametrize("family", ["hrm", "hrm_text1"])
def test_recurrent_models_count_their_steps(family):
  from jaxlm.models.config_base import build_model
  if family == "hrm":
    base = dict(arch="hrm", vocab_size=64, d_model=64, n_heads=4, l_layers=1, h_layers=1, mlp_multiple=64)
    one = build_model({**base, "n_cycles": 1, "t_steps": 1})[0]
    more = build_model({**base, "n_cycles": 2, "t_steps": 3})[0]
    full = build_model({**base, "grad_mode": "full"})[0]
    block = flops._block_flops(64, 4, 4, 16, one.d_ff, flops.mean_keys_per_query(32, True, 0))
    # 2 x 3 L updates and 2 H updates instead of 1 + 1, forward only (the 1-step gradient is the same)
    np.testing.assert_allclose(flops.training_flops_per_token(more, 32) - flops.training_flops_per_token(one, 32),
                               (6 - 1 + 2 - 1) * block)
    assert flops.training_flops_per_token(full, 32) > flops.training_flops_per_token(
        build_model(base)[0], 32)
  else:
    base = dict(arch="hrm_text1", vocab_size=64, d_model=64, n_heads=4, n_layers=2, d_ff=128)
    two = build_model({**base, "halt_max_steps": 2})[0]
    five = build_model({**base, "halt_max_steps": 5})[0]
    head = 3 * 2.0 * 64 * 64
    np.testing.assert_allclose(flops.training_flops_per_token(five, 32) - head,
                               4 * (flops.training_flops_per_token(two, 32) - head))
