"""python -m jaxlm.score on converted fixtures: logits equal the original's, plus log-likelihood and perplexity."""
import json
import math
import os

import numpy as np
import pytest

from convert import api
from jaxlm import modeldir, score

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
HROM = os.path.join(FIXTURES, "hrom")


@pytest.fixture(scope="module")
def hrom_dir(tmp_path_factory):
  return api.torch2jax(os.path.join(HROM, "hrom_20261125_133958_step0.pt"), str(tmp_path_factory.mktemp("s") / "hrom"))


def expected_stats(logits, ids, mask):
  """Mean log p(token t+1 | <= t) over pairs of real tokens, computed independently in float64 numpy."""
  z = logits[:, :-1].astype(np.float64)
  log_probs = z - z.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  lp = np.take_along_axis(log_probs, ids[:, 1:, None].astype(np.int64), -1)[..., 0]
  valid = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
  return int(valid.sum()), lp[valid].mean()


@pytest.mark.parametrize("with_mask", [True, False])
def test_score_cli_writes_the_original_logits_and_reports_perplexity(hrom_dir, tmp_path, capsys, with_mask):
  out = tmp_path / "logits.npy"
  argv = ["--checkpoint", hrom_dir, "--tokens", os.path.join(HROM, "input_ids.npy"), "--out", str(out),
          "--log-probs", str(tmp_path / "lp.npy")]
  if with_mask:
    argv += ["--mask", os.path.join(HROM, "attention_mask.npy")]
  assert score.main(argv) == 0
  logits = np.load(out)
  reference = np.load(os.path.join(HROM, "logits.npy" if with_mask else "logits_nomask.npy"))
  assert logits.dtype == np.float32 and logits.shape == reference.shape
  assert np.abs(logits - reference).max() <= 1e-5
  printed = capsys.readouterr().out
  assert "mean log-likelihood:" in printed and "perplexity:" in printed
  stats = json.loads(printed.strip().splitlines()[-1])
  ids = np.load(os.path.join(HROM, "input_ids.npy"))
  mask = np.load(os.path.join(HROM, "attention_mask.npy")) if with_mask else np.ones_like(ids)
  n, mean = expected_stats(reference, ids, mask)
  assert stats["tokens"] == n == (41 if with_mask else 46)
  assert stats["mean_log_likelihood"] == pytest.approx(mean, abs=1e-5)
  assert stats["perplexity"] == pytest.approx(math.exp(-mean), rel=1e-5)
  assert np.load(tmp_path / "lp.npy").shape == (2, 23)


def test_score_matches_the_original_training_loss(hrom_dir):
  """With the fixture's own labels, the mean log-likelihood is minus HROM's cross-entropy loss."""
  _, module, params, _ = modeldir.load_model_dir(hrom_dir)
  ids = np.load(os.path.join(HROM, "input_ids.npy"))
  labels = np.load(os.path.join(HROM, "labels.npy"))
  mask = np.load(os.path.join(HROM, "attention_mask.npy"))
  logits, _, _ = score.score(module, params, ids, mask)
  z = logits.astype(np.float64)
  log_probs = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
  lp = np.take_along_axis(log_probs, labels[..., None].astype(np.int64), -1)[..., 0]
  assert -lp[labels != 0].mean() == pytest.approx(float(np.load(os.path.join(HROM, "loss.npy"))), abs=1e-5)


def test_score_rejects_bad_inputs(hrom_dir, tmp_path, capsys):
  ids = tmp_path / "ids.npy"
  np.save(ids, np.array([[1, 2, 999]], np.int32))
  assert score.main(["--checkpoint", hrom_dir, "--tokens", str(ids), "--out", str(tmp_path / "o.npy")]) == 2
  assert "999 is outside the vocabulary" in capsys.readouterr().err
  assert score.main(["--checkpoint", str(tmp_path), "--tokens", str(ids), "--out", str(tmp_path / "o.npy")]) == 2
  assert "not a model directory" in capsys.readouterr().err
  assert not (tmp_path / "o.npy").exists()


def test_score_reads_a_training_workdir(hrom_dir, tmp_path, capsys):
  """--checkpoint also takes a training workdir (its latest checkpoint) via jaxlm.checkpoint."""
  checkpoint = pytest.importorskip("jaxlm.checkpoint")
  loaded = modeldir.load(hrom_dir)
  run = checkpoint.RunCheckpointer(str(tmp_path / "work"))
  run.save(7, {"params": loaded.params}, {"model": loaded.model_dict})
  run.close()
  out = tmp_path / "logits.npy"
  argv = ["--checkpoint", str(tmp_path / "work"), "--tokens", os.path.join(HROM, "input_ids.npy"), "--out", str(out)]
  assert score.main(argv) == 0
  assert np.abs(np.load(out) - np.load(os.path.join(HROM, "logits_nomask.npy"))).max() <= 1e-5


def test_optimus_prime_log_likelihood_equals_its_saved_validation_loss(tmp_path, capsys):
  """best_model.pt stores val_loss = the original's shifted cross-entropy on the fixture input_ids."""
  fixture = os.path.join(FIXTURES, "optimus_prime")
  model_dir = api.torch2jax(os.path.join(fixture, "best_model.pt"), str(tmp_path / "op"))
  argv = ["--checkpoint", model_dir, "--tokens", os.path.join(fixture, "input_ids.npy"),
          "--out", str(tmp_path / "l.npy")]
  assert score.main(argv) == 0
  stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  val_loss = modeldir.read_config(model_dir)["source"]["extras"]["val_loss"]
  assert -stats["mean_log_likelihood"] == pytest.approx(val_loss, abs=1e-5)


def test_score_applies_hrm_reasoning_modes(tmp_path, capsys):
  hrm = os.path.join(FIXTURES, "hrm")
  model = api.torch2jax(os.path.join(hrm, "hrm_continual_learning.pt"), str(tmp_path / "hrm"), family="hrm")
  ids = os.path.join(hrm, "input_ids.npy")
  reference = np.load(os.path.join(hrm, "logits.npy"))  # the original with N=2, T=2 (its 'normal' mode)
  tolerance = 2e-5 * np.abs(reference).max()
  outputs = {}
  for mode in ("normal", "fast"):
    out = tmp_path / f"{mode}.npy"
    assert score.main(["--checkpoint", model, "--tokens", ids, "--out", str(out), "--mode", mode]) == 0
    outputs[mode] = np.load(out)
  np.testing.assert_allclose(outputs["normal"], reference, atol=tolerance)
  assert np.abs(outputs["fast"] - reference).max() > 100 * tolerance  # fewer cycles: a different function
  explicit = tmp_path / "explicit.npy"
  assert score.main(["--checkpoint", model, "--tokens", ids, "--out", str(explicit), "--mode", "fast",
                     "--n-cycles", "2", "--t-steps", "2"]) == 0
  np.testing.assert_array_equal(np.load(explicit), outputs["normal"])  # explicit N and T win over --mode
  capsys.readouterr()
  assert score.main(["--checkpoint", model, "--tokens", ids, "--out", str(explicit), "--mode", "ludicrous"]) == 2
  assert "unknown reasoning mode 'ludicrous'" in capsys.readouterr().err
