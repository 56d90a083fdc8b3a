"""python -m jaxlm.score on converted fixtures: logits equal the original's, plus log-likelihood and perplexity."""
import errno
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


def test_unreadable_inputs_name_the_path(run, hrom_dir, monkeypatch):
  config_json = os.path.join(hrom_dir, "config.json")
  real_open = open

  def unreadable(path, *args, **kwargs):
    if str(path) == config_json:
      raise PermissionError(errno.EACCES, "Permission denied", path)
    return real_open(path, *args, **kwargs)
  monkeypatch.setattr(modeldir, "open", unreadable, raising=False)
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
