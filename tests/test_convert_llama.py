"""--family llama: jaxlm -> Hugging Face Llama (checked in transformers' LlamaForCausalLM) and back."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from convert import api  # noqa: E402
from convert.errors import ConversionError  # noqa: E402
from jaxlm import modeldir  # noqa: E402
from fixture_tolerance import assert_logits_close  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
IDS = np.random.default_rng(0).integers(0, 101, size=(2, 13)).astype(np.int32)


def jax_logits(model_dir, ids):
  _, module, params, _ = modeldir.load_model_dir(model_dir)
  return np.asarray(jax.jit(lambda p, t: module.apply({"params": p}, t))(params, jnp.asarray(ids)))


def hf_logits(hf_dir, ids):
  model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
  with torch.no_grad():
    return model(torch.tensor(ids).long()).logits.numpy()


def random_model_dir(path, **overrides):
  model = dict(arch="decoder", vocab_size=101, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=72,
               norm="rms", norm_eps=1e-6, glu="silu", rope_theta=5000.0, causal=True, max_seq_len=64)
  model.update(overrides)
  # random values on jaxlm's own parameter tree (no init compile: faster); norm scales 1 + 0.1 randn
  rng = np.random.default_rng(1)
  params = {k: (float(k.endswith("scale")) + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            for k, shape in modeldir.expected_param_shapes(model).items()}
  return modeldir.save_model_dir(str(path), model, traverse_util.unflatten_dict(params, sep="/"))


@pytest.mark.parametrize("variant", [
    dict(rope_style="interleaved", attn_bias=True, mlp_bias=True),           # Optimus-like, q/k permuted
    dict(rope_style="half", tie_embeddings=True, glu="gelu_tanh", n_kv_heads=1, head_dim=16),
])
def test_jaxlm_model_exported_to_llama_gives_the_same_logits_in_transformers(tmp_path, variant):
  model_dir = random_model_dir(tmp_path / "model", **variant)
  hf_dir = api.jax2torch(model_dir, str(tmp_path / "hf"), family="llama")
  assert sorted(os.listdir(hf_dir)) == ["config.json", "model.safetensors"]
  expected = jax_logits(model_dir, IDS)
  # measured (abs / max|logit|): interleaved 1.2e-6 / 2.46 = 4.8e-7, half 1.5e-6 / 2.72 = 5.5e-7
  assert_logits_close(hf_logits(hf_dir, IDS), expected, 2.5e-6, f"llama export {variant}: transformers vs jaxlm")
  back = api.torch2jax(hf_dir, str(tmp_path / "back"))  # family detected from config.json
  # measured (abs / max|logit|): interleaved 1.1e-6 / 2.46 = 4.4e-7 (imported back as rotate-half with permuted
  # q/k), half 0 (the same program)
  assert_logits_close(jax_logits(back, IDS), expected, 2.5e-6, f"llama export {variant}: imported back")


@pytest.mark.parametrize("twin", ["untrained", "perturbed"])
def test_optimus_prime_fixture_through_llama_matches_the_original_logits(tmp_path, twin):
  """The fixture and its perturbed twin (trained-like weights, norm scales away from 1, by the original code)."""
  fixture = os.path.join(FIXTURES, "optimus_prime", *(("perturbed",) if twin == "perturbed" else ()))
  imported = api.torch2jax(os.path.join(fixture, "best_model.pt"), str(tmp_path / "op"))
  hf_dir = api.jax2torch(imported, str(tmp_path / "hf"), family="llama")
  ids = np.load(os.path.join(fixture, "input_ids.npy"))
  # measured (abs / max|logit|): untrained 1.5e-7 / 0.65 = 2.3e-7, perturbed 2.4e-7 / 0.60 = 4.0e-7
  assert_logits_close(hf_logits(hf_dir, ids), np.load(os.path.join(fixture, "logits.npy")), 1.5e-6,
                      f"optimus_prime {twin} -> llama: transformers vs the original's logits")


def test_hugging_face_llama_imports_into_jaxlm(tmp_path):
  config = transformers.LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                    num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5,
                                    rope_theta=20000.0, attention_bias=True, tie_word_embeddings=True,
                                    max_position_embeddings=64)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # non-trivial norm weights and biases
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(str(tmp_path / "hf"))
  with torch.no_grad():
    expected = model(torch.tensor(IDS).long()).logits.numpy()
  out = api.torch2jax(str(tmp_path / "hf"), str(tmp_path / "jax"), family="llama")
  # measured (abs / max|logit|): 7.2e-7 / 1.63 = 4.4e-7
  assert_logits_close(jax_logits(out, IDS), expected, 2.5e-6, "llama import: jaxlm vs transformers")
  assert modeldir.read_config(out)["model"]["tie_embeddings"] is True


def test_models_llama_cannot_express_are_refused(tmp_path):
  imported = api.torch2jax(os.path.join(FIXTURES, "hrom", "hrom_20261125_133958_step0.pt"), str(tmp_path / "h"))
  with pytest.raises(ConversionError, match="model.norm is 'layer'"):
    api.jax2torch(imported, str(tmp_path / "hf"), family="llama")
  assert not os.path.exists(tmp_path / "hf")
