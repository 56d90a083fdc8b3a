"""model.dtype=bfloat16: parameters, softmax, norms and loss stay float32; a short run tracks the float32 run."""
import os

import jax
import numpy as np

from jaxlm import trainer
from jaxlm.checkpoint import restore_for_inference
from jaxlm.config_defaults import load_config
from jaxlm.metrics import read_metrics
from jaxlm.models.config_base import auto_dtype, build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Measured on this recipe (losses 4.18 -> 3.5): max relative difference per step 5.5e-5 (8.7e-5 over 60 steps).
REL_TOL = 1e-3


def _run(tmp_path, dtype):
  c = load_config(os.path.join(ROOT, "configs", "yinggem.py:tiny"))
  c.model.update(d_model=32, n_layers=2, n_heads=2, d_ff=64, attention_window=16, max_seq_len=16, dtype=dtype)
  c.data.update(eval_batches=2)
  c.opt.update(warmup_steps=2)
  c.train.update(steps=40, batch_size=8, seq_len=16, eval_every=40, save_every=40, log_every=1, sample_tokens=0,
                 progress=False)
  workdir = str(tmp_path / dtype)
  trainer.train_and_evaluate(c, workdir)
  losses = np.array([r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r])
  return losses, workdir


def test_bfloat16_run_tracks_the_float32_run(tmp_path):
  full, _ = _run(tmp_path, "float32")
  half, workdir = _run(tmp_path, "bfloat16")
  assert len(full) == len(half) == 40
  assert half[-1] < half[0] - 0.3  # it learns
  rel = np.abs(half - full) / full
  print(f"\nbf16 vs f32: max relative loss difference {rel.max():.2e}")
  assert rel.max() <= REL_TOL
  assert rel.max() > 0  # really computed in bfloat16
  model_dict, params, _ = restore_for_inference(workdir)
  assert model_dict["dtype"] == "bfloat16"
  assert {np.asarray(x).dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}


def test_auto_dtype_is_bfloat16_only_on_accelerators():
  assert auto_dtype() == ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  config, _ = build_model(dict(vocab_size=11, d_model=8, n_layers=1, n_heads=2, d_ff=16, dtype="auto"))
  assert config.dtype == auto_dtype()
  for name in ("yinggem", "optimus_prime", "hrom", "hrm_text1", "hrm"):
    assert load_config(os.path.join(ROOT, "configs", f"{name}.py")).model.dtype == "auto"
