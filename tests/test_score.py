"""python -m jaxlm.score on converted fixtures: logits equal the original's, plus log-likelihood and perplexity.

Each fixture test runs on the untrained fixture and its perturbed twin (tests/fixtures/<family>/perturbed/, made by
the original code: trained-like weights, norm scales away from 1; HRM's halts after 2 of 4 segments).
"""
import errno
import json
import math
import os

import numpy as np
import pytest

from convert import api
from jaxlm import modeldir, score
from fixture_tolerance import assert_logits_close

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
HROM = os.path.join(FIXTURES, "hrom")
TWINS = ("untrained", "perturbed")
# Logits relative to the largest |logit| (the same forward as tests/test_convert_families.py and
# tests/test_convert_hrm.py; measured there): HROM 2.9e-7 untrained, 1.2e-7 perturbed.
HROM_REL = 1.5e-6


def folder(family, twin):
  return os.path.join(FIXTURES, family, *(("perturbed",) if twin == "perturbed" else ()))


@pytest.fixture(scope="module")
def hrom_dirs(tmp_path_factory):
  """twin -> HROM model directory."""
  root = tmp_path_factory.mktemp("s")
  return {twin: api.torch2jax(os.path.join(folder("hrom", twin), "hrom_20261125_133958_step0.pt"), str(root / twin))
          for twin in TWINS}


@pytest.fixture(scope="module")
def hrom_dir(hrom_dirs):
  return hrom_dirs["untrained"]


def expected_stats(logits, ids, mask):
  """Mean log p(token t+1 | <= t) over pairs of real tokens, computed independently in float64 numpy."""
  z = logits[:, :-1].astype(np.float64)
  log_probs = z - z.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  lp = np.take_along_axis(log_probs, ids[:, 1:, None].astype(np.int64), -1)[..., 0]
  valid = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
  return int(valid.sum()), lp[valid].mean()


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("with_mask", [True, False])
def test_score_cli_writes_the_original_logits_and_reports_perplexity(hrom_dirs, tmp_path, capsys, with_mask, twin):
  hrom = folder("hrom", twin)
  out = tmp_path / "logits.npy"
  argv = ["--checkpoint", hrom_dirs[twin], "--tokens", os.path.join(hrom, "input_ids.npy"), "--out", str(out),
          "--log-probs", str(tmp_path / "lp.npy")]
  if with_mask:
    argv += ["--mask", os.path.join(hrom, "attention_mask.npy")]
  assert score.main(argv) == 0
  logits = np.load(out)
  reference = np.load(os.path.join(hrom, "logits.npy" if with_mask else "logits_nomask.npy"))
  printed = capsys.readouterr().out
  assert logits.dtype == np.float32 and logits.shape == reference.shape
  assert_logits_close(logits, reference, HROM_REL, f"score hrom {twin} {'mask' if with_mask else 'no mask'}")
  assert "mean log-likelihood:" in printed and "perplexity:" in printed
  stats = json.loads(printed.strip().splitlines()[-1])
  ids = np.load(os.path.join(hrom, "input_ids.npy"))
  mask = np.load(os.path.join(hrom, "attention_mask.npy")) if with_mask else np.ones_like(ids)
  n, mean = expected_stats(reference, ids, mask)
  assert stats["tokens"] == n == (41 if with_mask else 46)
  assert stats["mean_log_likelihood"] == pytest.approx(mean, abs=1e-5)
  assert stats["perplexity"] == pytest.approx(math.exp(-mean), rel=1e-5)
  assert np.load(tmp_path / "lp.npy").shape == (2, 23)


def test_score_matches_the_original_training_loss(hrom_dir):
  """With the fixture's own labels, the mean log-likelihood is minus HROM's cross-entropy loss. (The perturbed twin
  has no labels.npy / loss.npy: its logits, from which the loss follows, are checked by the CLI test above.)"""
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


@pytest.mark.parametrize("twin", TWINS)
def test_score_reads_a_training_workdir(hrom_dirs, tmp_path, capsys, twin):
  """--checkpoint also takes a training workdir (its latest checkpoint) via jaxlm.checkpoint."""
  checkpoint = pytest.importorskip("jaxlm.checkpoint")
  loaded = modeldir.load(hrom_dirs[twin])
  run = checkpoint.RunCheckpointer(str(tmp_path / "work"))
  run.save(7, {"params": loaded.params}, {"model": loaded.model_dict})
  run.close()
  out = tmp_path / "logits.npy"
  argv = ["--checkpoint", str(tmp_path / "work"), "--tokens", os.path.join(folder("hrom", twin), "input_ids.npy"),
          "--out", str(out)]
  assert score.main(argv) == 0
  assert_logits_close(np.load(out), np.load(os.path.join(folder("hrom", twin), "logits_nomask.npy")), HROM_REL,
                      f"score hrom {twin} from a workdir")


@pytest.mark.parametrize("twin", TWINS)
def test_optimus_prime_log_likelihood_equals_the_originals(tmp_path, capsys, twin):
  """best_model.pt stores val_loss = the original's shifted cross-entropy on the fixture input_ids. The perturbed
  twin keeps the untrained one's dict (only model_state_dict changed): there the expected mean log-likelihood is
  computed from the original's logits (logits.npy)."""
  fixture = folder("optimus_prime", twin)
  model_dir = api.torch2jax(os.path.join(fixture, "best_model.pt"), str(tmp_path / "op"))
  argv = ["--checkpoint", model_dir, "--tokens", os.path.join(fixture, "input_ids.npy"),
          "--out", str(tmp_path / "l.npy")]
  assert score.main(argv) == 0
  stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  reference = np.load(os.path.join(fixture, "logits.npy"))
  # measured (tests/test_convert_families.py): 3.0e-7 untrained, 4.0e-7 perturbed
  assert_logits_close(np.load(tmp_path / "l.npy"), reference, 1.5e-6, f"score optimus_prime {twin}")
  if twin == "untrained":
    val_loss = modeldir.read_config(model_dir)["source"]["extras"]["val_loss"]
    assert -stats["mean_log_likelihood"] == pytest.approx(val_loss, abs=1e-5)
  else:
    ids = np.load(os.path.join(fixture, "input_ids.npy"))
    assert stats["mean_log_likelihood"] == pytest.approx(expected_stats(reference, ids, np.ones_like(ids))[1], abs=1e-5)


# HRM's ACT logits relative to the largest |logit| (measured in tests/test_convert_hrm.py: untrained 9.0e-6, four
# segments amplify float32 rounding; perturbed, halting after 2 segments, 6.2e-7).
HRM_REL = {"untrained": 3e-5, "perturbed": 3e-6}


@pytest.mark.parametrize("twin", TWINS)
def test_score_applies_hrm_reasoning_modes(tmp_path, capsys, twin):
  hrm = folder("hrm", twin)
  model = api.torch2jax(os.path.join(hrm, "hrm_continual_learning.pt"), str(tmp_path / "hrm"), family="hrm")
  ids = os.path.join(hrm, "input_ids.npy")
  reference = np.load(os.path.join(hrm, "logits.npy"))  # the original with N=2, T=2 (its 'normal' mode)
  outputs = {}
  for mode in ("normal", "fast"):
    out = tmp_path / f"{mode}.npy"
    assert score.main(["--checkpoint", model, "--tokens", ids, "--out", str(out), "--mode", mode]) == 0
    outputs[mode] = np.load(out)
  assert_logits_close(outputs["normal"], reference, HRM_REL[twin], f"score hrm {twin} (normal mode)")
  # fewer cycles: a different function
  assert np.abs(outputs["fast"] - reference).max() > 100 * HRM_REL[twin] * np.abs(reference).max()
  explicit = tmp_path / "explicit.npy"
  assert score.main(["--checkpoint", model, "--tokens", ids, "--out", str(explicit), "--mode", "fast",
                     "--n-cycles", "2", "--t-steps", "2"]) == 0
  np.testing.assert_array_equal(np.load(explicit), outputs["normal"])  # explicit N and T win over --mode
  capsys.readouterr()
  assert score.main(["--checkpoint", model, "--tokens", ids, "--out", str(explicit), "--mode", "ludicrous"]) == 2
  assert "unknown reasoning mode 'ludicrous'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ errors: one line, exit codes
@pytest.fixture
def run(hrom_dir, tmp_path, capsys, monkeypatch):
  """score.main on the fixture's ids -> (exit code, stderr); --out is tmp_path/out/logits.npy."""
  monkeypatch.delenv("JAXLM_VERBOSE", raising=False)

  def call(*extra, out=None):
    out = str(out or tmp_path / "out" / "logits.npy")
    code = score.main(["--checkpoint", hrom_dir, "--tokens", os.path.join(HROM, "input_ids.npy"), "--out", out,
                       *extra])
    return code, capsys.readouterr().err
  return call


def test_out_of_range_values_are_refused(run):
  assert run("--batch-size", "-1") == (2, "error: --batch-size=-1: must be an integer >= 0 (0 = all rows at once)\n")
  assert run("--n-cycles", "0") == (2, "error: --n-cycles=0: must be an integer >= 1\n")


def test_an_out_whose_parent_is_a_file_names_the_path(run, tmp_path):
  (tmp_path / "file").write_text("not a directory")
  out = tmp_path / "file" / "logits.npy"
  assert run(out=out) == (1, f"error: {out}: a path component is not a directory\n")


def test_a_read_only_out_names_the_path(run, tmp_path, monkeypatch):
  out = tmp_path / "out" / "logits.npy"
  real_open = os.open

  def read_only(path, *args, **kwargs):
    if os.path.dirname(path) == str(out.parent):
      raise OSError(errno.EROFS, "Read-only file system", path)
    return real_open(path, *args, **kwargs)
  monkeypatch.setattr(os, "open", read_only)
  assert run() == (1, f"error: {out}: read-only file system\n")


def test_outputs_get_the_usual_file_mode(run, tmp_path):
  umask = os.umask(0o022)
  try:
    assert run()[0] == 0
  finally:
    os.umask(umask)
  assert (tmp_path / "out" / "logits.npy").stat().st_mode & 0o777 == 0o644


def test_a_full_disk_leaves_no_partial_output(run, tmp_path, monkeypatch):
  out = tmp_path / "out" / "logits.npy"
  out.parent.mkdir()
  out.write_bytes(b"an earlier result")
  real_save = np.save

  def disk_fills_up(file, array, *args, **kwargs):
    file.write(b"\x93NUMPY partial")
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(np, "save", disk_fills_up)
  assert run() == (1, f"error: {out}: no space left on the device\n")
  assert os.listdir(out.parent) == ["logits.npy"] and out.read_bytes() == b"an earlier result"
  code, err = run("--verbose")
  assert code == 1 and "Traceback (most recent call last)" in err and "disk_fills_up" in err
  # The second output failing leaves neither.
  calls = []

  def second_fails(file, array, *args, **kwargs):
    calls.append(array.shape)
    if len(calls) == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    real_save(file, array, *args, **kwargs)
  monkeypatch.setattr(np, "save", second_fails)
  out.unlink()
  lp = tmp_path / "out" / "lp.npy"
  assert run("--log-probs", str(lp)) == (1, f"error: {lp}: no space left on the device\n")
  assert os.listdir(out.parent) == []


def test_unreadable_inputs_name_the_path(run, hrom_dir, monkeypatch, unreadable_config):
  config_json = unreadable_config(hrom_dir)
  assert run() == (1, f"error: {config_json}: permission denied\n")
  monkeypatch.undo()
  monkeypatch.delenv("JAXLM_VERBOSE", raising=False)
  ids = os.path.join(HROM, "input_ids.npy")

  def unreadable_ids(path, *args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied", path)
  monkeypatch.setattr(np, "load", unreadable_ids)
  assert run() == (1, f"error: {ids}: permission denied\n")


def test_ctrl_c_exits_130_and_writes_nothing(run, tmp_path, monkeypatch):
  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(score, "score", interrupted)
  assert run() == (130, "error: aborted (Ctrl-C)\n")
  assert not (tmp_path / "out").exists()
