"""jaxlm.grow: added blocks start as the identity, so the grown model's logits equal the source's (decoder
families, HRM with ACT), with the growth recorded in the history; models with no identity block are refused."""
import json
import os
import sys

import numpy as np
import pytest

from jaxlm import grow, lineage, modeldir, vocab_growth
from jaxlm.config_defaults import load_config
from small_models import random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def family_model(family, **changes):
  model = load_config(os.path.join(ROOT, "configs", f"{family}.py:tiny")).model.to_dict()
  # Model directories hold the per-block layout (yinggem:tiny trains its blocks stacked).
  model.update(vocab_size=40, d_model=16, n_heads=2, max_seq_len=8, dtype="float32", **changes)
  if model["arch"] == "decoder":
    model["scan_layers"] = False
    model.update(n_layers=2, d_ff=32, n_kv_heads=0, head_dim=0)
    if model.get("attention_window"):
      model["attention_window"] = 4
  return model


CASES = {  # family -> (model changes, grow arguments)
    "hrom": ({}, dict(add_layers_k=2)),
    "optimus_prime": ({}, dict(add_layers_k=1)),
    "yinggem": ({}, dict(add_layers_k=2)),
    "hrm": (dict(l_layers=1, h_layers=1, n_cycles=1, t_steps=1, train_mode="act", halt_max_steps=2),
            dict(add_l=1, add_h=2)),
}


forward = vocab_growth.forward  # canonical logits, one compiled function per model config


@pytest.mark.parametrize("family", sorted(CASES))
def test_grown_model_computes_the_same_logits(family):
  changes, how = CASES[family]
  model = family_model(family, **changes)
  params = random_params(model)
  if family == "hrm":
    grown_model, grown = grow.add_hrm_layers(model, params, how["add_l"], how["add_h"])
    assert (grown_model["l_layers"], grown_model["h_layers"]) == (2, 3)
  else:
    grown_model, grown = grow.add_layers(model, params, how["add_layers_k"])
    assert grown_model["n_layers"] == 2 + how["add_layers_k"]
  modeldir.check_params(grown_model, grown)  # the tree the grown config expects
  ids = np.random.default_rng(1).integers(0, 40, size=(2, 8)).astype(np.int32)
  before, after = forward(model, params, ids), forward(grown_model, grown, ids)
  # measured max |difference|: 0.0 for every family (x + 0 is exact)
  assert np.max(np.abs(after - before)) <= 1e-6 * np.max(np.abs(before)), family


def test_cli_writes_the_grown_directory_with_its_history(tmp_path):
  model = family_model("optimus_prime")
  src = modeldir.save_model_dir(str(tmp_path / "src"), model, random_params(model),
                                source={"family": "optimus_prime"}, history=[lineage.entry("alice", vocab_size=40)])
  assert grow.main(["--src", src, "--out", str(tmp_path / "grown"), "--add-layers", "2"]) == 0
  grown = modeldir.load(str(tmp_path / "grown"))
  assert grown.model_dict["n_layers"] == 4
  history = lineage.read(str(tmp_path / "grown"))
  assert history[0]["corpus"] == "alice" and history[-1]["events"][-1]["kind"] == "layers"
  assert history[-1]["events"][-1]["params_after"] > history[-1]["events"][-1]["params_before"]


def test_refusals_name_the_reason(tmp_path):
  post = family_model("hrm", l_layers=1, h_layers=1, norm_position="post")
  params = random_params(post)
  with pytest.raises(ValueError, match="post-norm"):
    grow.add_hrm_layers(post, params, 1, 0)
  with pytest.raises(ValueError, match="--add-layers grows decoder models"):
    grow.add_layers(post, params, 1)
  assert grow.main(["--src", str(tmp_path / "none"), "--out", str(tmp_path / "c"), "--add-layers", "1"]) == 2
  assert grow.main(["--src", str(tmp_path), "--out", str(tmp_path / "d")]) == 2  # nothing to add
  assert not os.path.exists(tmp_path / "c") and not os.path.exists(tmp_path / "d")
