"""Multi-process training (2 local processes x 4 emulated CPU devices, gloo): the same run as 1 process x 8
devices, checkpoints that move between topologies, a preemption that stops every process at the same step, and
asynchronous checkpoints that survive kill -9."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxlm.checkpoint import RunCheckpointer
from jaxlm.metrics import read_metrics
from tests.multiprocess import ROOT, device_env, distributed_flags, finish, free_port, run_tasks, start

pytestmark = pytest.mark.slow

MESHES = {"data": {"data": -1}, "fsdp": {"data": 1, "fsdp": -1}, "data_fsdp_model": {"data": 2, "fsdp": 2, "model": 2}}
ONE_LAYER = {"n_layers": 1}  # the decoder: what is tested is the distribution, not depth; compiles faster


def _values(rows):
  return [v for _, v in rows]


def test_two_processes_give_the_same_losses_as_one(tmp_path):
  """The same 6 steps (and 2 evaluations) on 1 process x 8 devices and 2 x 4: a decoder on a data x fsdp x model
  mesh (every kind of axis in one run), HRM on fsdp (parameters sharded across the processes). The data mesh: 150
  steps in the preemption test below (2 x 4 against 1 x 1); 1 x 1 against 1 x 8: the cross-topology test. Then a
  decoder trained on Alice is continued on tiny Shakespeare (issue 13: its vocabulary grows, half the examples
  replay Alice, a block is added after 256 characters, samples are drawn; issue 14: Muon with its state sharded
  over fsdp x model, evaluations on a random subset then the whole split): the same losses on both topologies."""
  cases = [("yinggem", "data_fsdp_model"), ("hrm", "fsdp")]

  def tasks(where):
    return [{"name": f"{family}-{mesh}", "family": family, "mesh": MESHES[mesh],
             "train": {"steps": 6, "eval_every": 3}, "model": ONE_LAYER if family == "yinggem" else {},
             "workdir": str(tmp_path / where / f"{family}-{mesh}")} for family, mesh in cases]

  def continual(where):  # a parent on Alice, continued on Shakespeare: vocabulary growth, replay, depth growth
    parent = str(tmp_path / where / "parent")
    return [{"name": "parent", "model": ONE_LAYER, "data": {"corpus": "alice"}, "mesh": MESHES["data"],
             "train": {"steps": 2, "eval_every": 0}, "workdir": parent},
            {"name": "continued", "mesh": MESHES["data_fsdp_model"], "data": {"corpus": "tinyshakespeare", "replay": 0.5},
             "train": {"steps": 4, "eval_every": 2, "init_from": parent, "on_new_corpus": "continue",
                       "grow_every_chars": 2 * 8 * 16, "sample_every": 2, "sample_tokens": 4, "eval_windows": 8},
             "opt": {"name": "muon", "lr": 0.02},
             "workdir": str(tmp_path / where / "continued")}]

  one = run_tasks(tasks("1x8") + continual("1x8"), processes=1, devices=8)
  two = run_tasks(tasks("2x4") + continual("2x4"), processes=2, devices=4)
  for where in ("1x8", "2x4"):
    stage = json.loads((tmp_path / where / "continued" / "config.json").read_text())["history"][-1]
    assert stage["replay"]["corpora"] == ["alice"] and stage["from"] == str(tmp_path / where / "parent")
    assert [e["kind"] for e in stage["events"]] == ["vocab", "layers"], stage["events"]
  for name in ("parent", "continued"):
    diff = np.abs(np.subtract(_values(two[name]["losses"]), _values(one[name]["losses"]))).max()
    eval_diff = np.abs(np.subtract(_values(two[name]["evals"]), _values(one[name]["evals"]))).max() if one[name]["evals"] else 0
    print(f"\n{name}: max |loss 2x4 - loss 1x8| = {diff:.2e}, eval {eval_diff:.2e}")
    assert len(two[name]["losses"]) == (2 if name == "parent" else 4) and diff <= 1e-5 and eval_diff <= 1e-5
  for family, mesh in cases:
    name = f"{family}-{mesh}"
    assert one[name]["devices"] == two[name]["devices"] == 8
    assert (one[name]["processes"], two[name]["processes"]) == (1, 2)
    assert [s for s, _ in two[name]["losses"]] == list(range(1, 7))
    diff = np.abs(np.subtract(_values(two[name]["losses"]), _values(one[name]["losses"]))).max()
    eval_diff = np.abs(np.subtract(_values(two[name]["evals"]), _values(one[name]["evals"]))).max()
    print(f"\n{name}: max |loss 2x4 - loss 1x8| = {diff:.2e}, eval {eval_diff:.2e}")
    assert diff <= 1e-5 and eval_diff <= 1e-5
  # Not trivially equal (e.g. to a run that drops the second process's rows): the losses move.
  assert len({round(l, 4) for _, l in one["yinggem-data_fsdp_model"]["losses"]}) > 3


def test_checkpoints_move_between_topologies(tmp_path):
  """Written by 2 processes x 4 devices (parameters sharded over both processes), continued on 1 x 1, 1 x 8 and
  2 x 4; written by 1 x 8, continued on 2 x 4: the next losses equal an uninterrupted run."""
  fsdp = MESHES["fsdp"]
  train = {"steps": 10, "eval_every": 0, "save_every": 100}

  def task(name, workdir, mesh=fsdp, stop_after=None):
    return {"name": name, "mesh": mesh, "train": train, "model": ONE_LAYER, "workdir": str(tmp_path / workdir),
            "stop_after": stop_after}

  run_tasks([task("half", "w2x4", stop_after=5)], processes=2, devices=4)
  for copy in ("on1x1", "on1x8", "on2x4"):
    shutil.copytree(tmp_path / "w2x4", tmp_path / copy)
  eight = run_tasks([task("ref", "ref"), task("half", "w1x8", stop_after=5), task("on1x8", "on1x8")],
                    processes=1, devices=8)
  shutil.copytree(tmp_path / "w1x8", tmp_path / "from1x8")
  one = run_tasks([task("on1x1", "on1x1", mesh={"data": -1})], processes=1, devices=1)
  two = run_tasks([task("on2x4", "on2x4"), task("from1x8", "from1x8")], processes=2, devices=4)
  assert RunCheckpointer(str(tmp_path / "w2x4")).latest_step() == 5
  reference = eight["ref"]["losses"]
  for name, result in [("on1x1", one), ("on1x8", eight), ("on2x4", two), ("from1x8", two)]:
    rows = result[name]["losses"]
    assert result[name]["step"] == 10 and [s for s, _ in rows] == list(range(1, 11)), name
    diff = np.abs(np.subtract(_values(rows), _values(reference))).max()
    print(f"\n{name}: max |loss - uninterrupted 1x8| = {diff:.2e}")
    assert diff <= 1e-5, name


_CLI_ARGS = ["--config", os.path.join(ROOT, "configs", "yinggem.py:tiny"), "--config.model.d_model=32",
             "--config.model.n_layers=1", "--config.model.n_heads=2", "--config.model.d_ff=64",
             "--config.train.batch_size=8", "--config.train.log_every=1", "--config.train.eval_every=0",
             "--config.train.sample_tokens=0", "--config.train.progress=False"]


def _cli(workdir, *extra):
  return [sys.executable, "-m", "jaxlm.train", *_CLI_ARGS, "--workdir", str(workdir), *extra]


def _wait_for_rows(metrics, n, procs, timeout=300):
  deadline = time.time() + timeout
  while not (metrics.exists() and metrics.read_text().count("\n") >= n):
    assert all(p.poll() is None for p in procs), [p.stdout.read()[-3000:] for p in procs]
    assert time.time() < deadline
    time.sleep(0.05)


STEPS = 150


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """Losses of the CLI run that the interrupted runs below must reproduce (1 process, 1 device)."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  finish(start([_cli(workdir, f"--config.train.steps={STEPS}")], device_env(1)), timeout=300)
  return [(r["step"], r["loss"]) for r in read_metrics(str(workdir / "metrics.jsonl")) if "loss" in r]


def _losses(workdir):
  return [(r["step"], r["loss"]) for r in read_metrics(str(workdir / "metrics.jsonl")) if "loss" in r]


def test_sigterm_to_one_process_stops_all_at_the_same_step_and_resumes(tmp_path, uninterrupted):
  workdir = tmp_path / "run"

  def both_processes():
    port = free_port()
    return start([_cli(workdir, f"--config.train.steps={STEPS}", "--config.train.save_every=1000",
                       *distributed_flags(port, 2, i)) for i in range(2)], device_env(4))

  procs = both_processes()
  _wait_for_rows(workdir / "metrics.jsonl", 20, procs)
  procs[1].send_signal(signal.SIGTERM)  # a preemption notice reaching one host only
  outputs = finish(procs, timeout=300, expect_rc=75)  # interrupted and saved: "try again"
  stopped = [int(out.split("stopped on request after step ")[1].split()[0]) for out in outputs]
  assert stopped[0] == stopped[1] and 20 <= stopped[0] < STEPS, outputs[0][-2000:]
  assert RunCheckpointer(str(workdir)).latest_step() == stopped[0]
  assert f"interrupted (resume with the same command) at step {stopped[0]}" in outputs[0]

  outputs = finish(both_processes(), timeout=300)
  assert f"finished at step {STEPS}" in outputs[0]
  got = _losses(workdir)
  assert [s for s, _ in got] == list(range(1, STEPS + 1))
  diff = np.abs(np.subtract(_values(got), _values(uninterrupted))).max()
  print(f"\npreempted at step {stopped[0]}, resumed (2 x 4) vs uninterrupted (1 x 1): max |loss diff| = {diff:.2e}")
  assert diff <= 1e-5


def test_kill_during_asynchronous_saves_keeps_the_previous_checkpoint(tmp_path, uninterrupted):
  """kill -9 at random moments of a run that saves every 2 steps (a save is nearly always in flight): the latest
  checkpoint always restores, and the run resumed after every kill ends with the uninterrupted trajectory."""
  workdir, rng = tmp_path / "run", random.Random(0)
  args = [f"--config.train.steps={STEPS}", "--config.train.save_every=2", "--config.train.keep_checkpoints=2"]
  for _ in range(3):
    rows_before = (workdir / "metrics.jsonl").read_text().count("\n") if (workdir / "metrics.jsonl").exists() else 0
    proc = start([_cli(workdir, *args)], device_env(1))[0]
    _wait_for_rows(workdir / "metrics.jsonl", rows_before + 5, [proc])
    time.sleep(rng.uniform(0.0, 0.3))
    assert proc.poll() is None  # still training: the kill lands mid-run
    proc.kill()
    proc.wait()
    latest = RunCheckpointer(str(workdir)).latest_step()
    assert latest is not None and latest % 2 == 0
  finish(start([_cli(workdir, *args)], device_env(1)), timeout=300)
  got = _losses(workdir)
  assert [s for s, _ in got] == list(range(1, STEPS + 1))
  np.testing.assert_allclose(_values(got), _values(uninterrupted), rtol=0, atol=1e-6)
