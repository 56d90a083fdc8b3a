"""Every config loads and builds; full sizes have the originals' parameter counts; bad configs fail clearly."""
import glob
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jaxlm.config_defaults import load_config
from jaxlm.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL_SIZE_PARAMS = {"yinggem": 133_957_969, "optimus_prime": 224_652_288, "hrom": 58_019_072,
                    "hrm_text1": 117_129_740}


def _count(model_dict):
  _, model = build_model(model_dict)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  return sum(x.size for x in jax.tree.leaves(nn.unbox(shapes)))


@pytest.mark.parametrize("family,expected", sorted(FULL_SIZE_PARAMS.items()))
def test_full_size_parameter_counts_match_the_originals(family, expected):
  """Counted in the canonical layout (the vocabulary unpadded; scanned layers count the same)."""
  model = load_config(os.path.join(ROOT, "configs", f"{family}.py")).model.to_dict()
  padded = _count(model)
  model["vocab_multiple"] = 1 if "vocab_multiple" in model else None
  assert _count({k: v for k, v in model.items() if v is not None}) == expected
  if family in ("yinggem", "optimus_prime"):  # 50257 -> 50304 rows of embedding and head (and head bias)
    assert padded - expected == 47 * (2 * model["d_model"] + int(model["head_bias"]))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
@pytest.mark.parametrize("variant", ["", "original", "tiny"])
def test_every_config_variant_builds(path, variant):
  config = load_config(f"{path}:{variant}" if variant else path)
  model = config.model.to_dict()
  model["vocab_size"] = model["vocab_size"] or 65  # tiny variants take the vocabulary from the tokenizer
  assert _count(model) > 0
  for section in ("model", "data", "opt", "train", "mesh"):
    assert section in config


def test_unknown_variant_is_rejected():
  with pytest.raises(ValueError, match="unknown yinggem variant"):
    load_config(os.path.join(ROOT, "configs", "yinggem.py:huge"))


@pytest.mark.parametrize("change,message", [
    (dict(n_heads=3), "does not divide model.d_model"),
    (dict(n_kv_heads=3), "does not divide model.n_heads"),
    (dict(norm="batch"), "model.norm"),
    (dict(glu="relu"), "model.glu"),
    (dict(rope_style="xpos"), "model.rope_style"),
    (dict(attention_window=(4, 4, 4)), "3 entries for 2 layers"),
    (dict(n_hidden=7), r"unknown model config field\(s\) \['n_hidden'\]"),
    (dict(arch="mamba"), "unknown model.arch 'mamba'"),
])
def test_bad_model_configs_name_the_problem(change, message):
  base = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=4, d_ff=32)
  with pytest.raises(ValueError, match=message):
    build_model({**base, **change})
