"""A run never loses its data, never keeps a broken state, and says what went wrong in one line: the workdir lock,
non-finite losses, damaged checkpoints, file-system errors and exit codes."""
import gc
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bench import chaos  # the ways to damage a checkpoint, shared with bench/chaos.py
from jaxlm import checkpoint, lock, trainer
from jaxlm.metrics import read_metrics
from tests.test_train import ROOT, TINY, losses, small_config

FAST = dict(eval_every=0, save_every=4, log_every=1)
# Reading a damaged checkpoint leaves tensorstore coroutines that Python reports as unraisable when collected:
# collect them here, where the warning is expected, not in whichever later test the collector happens to run.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_garbage():
  yield
  gc.collect()


# ---------------------------------------------------------------------------------------------------- the lock
def _write_lock(workdir, **record):
  os.makedirs(workdir, exist_ok=True)
  base = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None, "token": "other",
          "started": time.time(), "heartbeat": time.time()}
  with open(os.path.join(workdir, lock.LOCK_FILE), "w") as f:
    json.dump({**base, **record}, f)


def _dead_pid():
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  return int(proc.stdout)


def test_a_live_holder_keeps_the_workdir(tmp_path):
  _write_lock(tmp_path)  # this test process: alive, on this host
  with pytest.raises(lock.WorkdirLocked, match=f"in use by process {os.getpid()} on host {socket.gethostname()}"):
    trainer.train_and_evaluate(small_config(steps=2, **FAST), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_a_dead_holders_lock_is_taken_over_and_released_at_the_end(tmp_path, caplog):
  _write_lock(tmp_path, pid=_dead_pid())
  with caplog.at_level(logging.WARNING, logger="jaxlm.lock"):
    result = trainer.train_and_evaluate(small_config(steps=2, **FAST), str(tmp_path))
  assert result.step == 2 and "is gone" in caplog.text
  assert not (tmp_path / lock.LOCK_FILE).exists()


def test_another_hosts_lock_is_stale_only_without_a_heartbeat(tmp_path):
  workdir = str(tmp_path)
  _write_lock(workdir, host="elsewhere", heartbeat=time.time())
  with pytest.raises(lock.WorkdirLocked, match="host elsewhere"):
    lock.WorkdirLock(workdir, stale_after_s=600).acquire()
  _write_lock(workdir, host="elsewhere", heartbeat=time.time() - 3600)
  taken = lock.WorkdirLock(workdir, stale_after_s=600)
  taken.acquire()
  assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["token"] == taken.record["token"]
  taken.release()
  assert not (tmp_path / lock.LOCK_FILE).exists()


def test_a_recycled_pid_is_not_the_holder(tmp_path):
  _write_lock(tmp_path, pid=os.getpid(), pid_start=1)  # our PID, but a process that started at another time
  held = lock.WorkdirLock(str(tmp_path))
  held.acquire()
  held.release()


# ---------------------------------------------------------------------------------------------------- NaN / Inf
def _diverging(**train):
  c = small_config(**train)
  c.opt.update(lr=1e6, clip_norm=0.0, schedule="constant")
  return c


def test_nonfinite_loss_stops_the_run_and_never_reaches_a_checkpoint(tmp_path):
  """lr 1e6 without clipping, a save every step: the run stops at the first NaN/Inf step it reads, every kept
  checkpoint is from before it and finite, and the next run resumes from the newest of them."""
  with pytest.raises(trainer.NonFiniteLoss, match=r"NaN/Inf at step (\d+).*the last checkpoint is intact") as err:
    trainer.train_and_evaluate(_diverging(steps=40, eval_every=0, save_every=1, log_every=20), str(tmp_path))
  first_bad = int(err.value.args[0].split("at step ")[1].split(";")[0].split()[0])
  steps = checkpoint.RunCheckpointer(str(tmp_path)).steps_newest_first()
  assert steps and max(steps) < first_bad
  _, params, _ = checkpoint.restore_for_inference(str(tmp_path))
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))
  again = _diverging(steps=max(steps) + 3, eval_every=0, save_every=1, log_every=1)
  again.train.on_nonfinite = "skip"
  assert trainer.train_and_evaluate(again, str(tmp_path)).step == max(steps) + 3
  assert [s for s, _ in losses(tmp_path)][-3:] == [max(steps) + 1, max(steps) + 2, max(steps) + 3]


def test_skip_mode_drops_bad_updates_and_trains_on(tmp_path):
  c = _diverging(steps=30, eval_every=0, save_every=10, log_every=10)
  c.train.on_nonfinite = "skip"
  result = trainer.train_and_evaluate(c, str(tmp_path))
  assert result.step == 30
  rows = read_metrics(str(tmp_path / "metrics.jsonl"))
  assert sum(r.get("skipped_updates", 0) for r in rows) >= 1
  _, params, _ = checkpoint.restore_for_inference(str(tmp_path))
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------------------- damage
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
  """A workdir interrupted at step 8 (checkpoints 4 and 8), and the uninterrupted run's losses."""
  root = tmp_path_factory.mktemp("damage")
  trainer.train_and_evaluate(small_config(steps=12, **FAST), str(root / "full"))
  trainer.train_and_evaluate(small_config(steps=12, **FAST), str(root / "half"), stop_after_steps=8)
  return root / "half", losses(root / "full")


@pytest.mark.parametrize("damage", sorted(chaos.DAMAGE))
def test_a_damaged_latest_checkpoint_is_reported_and_the_previous_one_used(two_checkpoints, tmp_path, damage,
                                                                            caplog):
  half, reference = two_checkpoints
  workdir = tmp_path / "run"
  shutil.copytree(half, workdir)
  chaos.DAMAGE[damage](workdir / "checkpoints" / "8")
  with caplog.at_level(logging.ERROR, logger="jaxlm.train"):
    result = trainer.train_and_evaluate(small_config(steps=12, **FAST), str(workdir))
  assert result.step == 12
  assert f"{workdir / 'checkpoints' / '8'}:" in caplog.text and "trying the previous checkpoint" in caplog.text
  assert [p.name.split("-")[0] for p in (workdir / "corrupt").iterdir()] == ["8"]
  got = losses(workdir)
  assert [s for s, _ in got] == list(range(1, 13))
  np.testing.assert_allclose([l for _, l in got], [l for _, l in reference], rtol=0, atol=1e-6)


def test_no_restorable_checkpoint_is_an_error_unless_a_fresh_start_is_asked_for(two_checkpoints, tmp_path):
  half, _ = two_checkpoints
  workdir = tmp_path / "run"
  shutil.copytree(half, workdir)
  for step in ("4", "8"):
    chaos.truncate_array_file(workdir / "checkpoints" / step)
  with pytest.raises(checkpoint.CheckpointUnusable, match=r"no checkpoint .* restores \(steps \[8, 4\].*"
                                                          r"on_unrestorable=fresh"):
    trainer.train_and_evaluate(small_config(steps=12, **FAST), str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]  # nothing moved without a good one
  c = small_config(steps=12, **FAST)
  c.train.on_unrestorable = "fresh"
  assert trainer.train_and_evaluate(c, str(workdir)).step == 12
  assert len(os.listdir(workdir / "corrupt")) == 2


def test_damaged_best_parameters_are_refused_for_inference(two_checkpoints, tmp_path):
  half, _ = two_checkpoints
  workdir = tmp_path / "run"
  shutil.copytree(half, workdir)
  chaos.wrong_checksum(workdir / "checkpoints" / "8")
  with pytest.raises(checkpoint.CheckpointUnusable, match="differ from what was written"):
    checkpoint.restore_for_inference(str(workdir))


def test_a_changed_optimizer_structure_names_the_config_field(two_checkpoints, tmp_path):
  half, _ = two_checkpoints
  workdir = tmp_path / "run"
  shutil.copytree(half, workdir)
  c = small_config(steps=12, **FAST)
  c.opt.clip_norm = 0.0
  with pytest.raises(ValueError, match=r"different arrays \(opt.clip_norm: checkpoint 1.0 vs config 0.0\)"):
    trainer.train_and_evaluate(c, str(workdir))
  assert not (workdir / "corrupt").exists()


# ---------------------------------------------------------------------------------------------------- the CLI
_CLI = [sys.executable, "-m", "jaxlm.train", "--config", TINY, "--config.model.d_model=32",
        "--config.model.n_layers=1", "--config.model.n_heads=2", "--config.model.d_ff=64",
        "--config.train.eval_every=0", "--config.train.sample_tokens=0", "--config.train.progress=False",
        "--config.train.log_every=5"]


def _cli(workdir, *extra, **kw):
  return subprocess.run([*_CLI, "--workdir", str(workdir), *extra], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, **kw)


def _one_line_error(out):
  lines = [l for l in out.stderr.strip().splitlines() if l.startswith("error: ")]
  assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  return lines[0]


def test_cli_file_system_problems_are_one_line(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  out = _cli(a_file)
  assert out.returncode == 2 and _one_line_error(out) == f"error: --workdir {a_file} is a file, not a directory"
  out = _cli("/sys/kernel")  # a directory nobody may write into, root included
  assert out.returncode == 1
  assert _one_line_error(out).startswith(f"error: /sys/kernel/{lock.LOCK_FILE}: ")


@pytest.mark.slow
def test_cli_second_run_on_a_workdir_is_refused_and_codes_tell_what_happened(tmp_path):
  workdir = tmp_path / "run"
  first = subprocess.Popen([*_CLI, "--workdir", str(workdir), "--config.train.steps=100000"], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 120
    while not ((workdir / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").read_text().count("\n") >= 2):
      assert first.poll() is None and time.time() < deadline
      time.sleep(0.1)
    second = _cli(workdir, "--config.train.steps=100000")
    assert second.returncode == 1
    assert _one_line_error(second).startswith(f"error: the workdir is in use by process {first.pid} on host ")
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert first.returncode == 75  # interrupted after saving: rerun to resume
  finally:
    first.kill()
  again = subprocess.Popen([*_CLI, "--workdir", str(workdir), "--config.train.steps=100000"], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  rows = (workdir / "metrics.jsonl").read_text().count("\n")
  while (workdir / "metrics.jsonl").read_text().count("\n") < rows + 2:
    assert again.poll() is None and time.time() < deadline
    time.sleep(0.1)
  again.send_signal(signal.SIGINT)
  time.sleep(0.01)
  again.send_signal(signal.SIGINT)  # the second Ctrl-C aborts
  _, stderr = again.communicate(timeout=120)
  assert again.returncode in (130, 75), stderr[-2000:]
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
  steps = [s for s, _ in losses(workdir)]  # a row every 5 steps: the resumed run left no gap and no repeat
  assert len(steps) >= 4 and steps == list(range(5, 5 * len(steps) + 1, 5))
