"""mesh.grad_sum: gradients summed by pairwise exchanges on several XLA:CPU devices (jaxlm/pairwise_sum.py).

The multi-device checks run tests/pairwise_probe.py on 4 emulated devices in a subprocess (a butterfly of two
exchanges); the choice of path is checked here on this process's one device.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxlm import pairwise_sum, sharding, validate
from multiprocess import ROOT, device_env
from test_train import small_config


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pairwise")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "pairwise_probe.py"), str(workdir)],
                       env=device_env(4), capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  params = lambda run: np.load(workdir / f"{run}.npz")
  return report, params


def _max_diff(a, b):
  assert a.files == b.files
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a.files)


def test_tree_sum_is_the_sum_with_the_same_bits_on_every_device(probe):
  report, _ = probe
  sums = report["tree_sum"]
  assert all(s["same_on_every_device"] for s in sums.values()), sums
  assert sums["i32"]["max_rel_error"] == 0.0
  assert sums["f32"]["max_rel_error"] < 1e-6  # 4 float32 terms of magnitudes 1e-3..1e2
  assert sums["bf16"]["max_rel_error"] < 2 ** -7  # summed in bfloat16


def test_auto_sums_pairwise_and_trains_as_the_all_reduce_does(probe):
  """Without randomness in the loss, auto compiles to collective permutes and no all-reduce, and the run's losses
  and parameters are the all-reduce's (to float32 rounding); every device keeps the same parameter bits."""
  report, params = probe
  auto, collective = report["auto"], report["collective"]
  assert auto["devices"] == 4
  assert auto["collectives"] == {"all-reduce": 0, "collective-permute": 2}, auto  # log2(4) exchanges
  assert collective["collectives"]["all-reduce"] >= 1 and collective["collectives"]["collective-permute"] == 0
  for run in ("auto", "auto_accum", "pairwise_dropout"):
    assert report[run]["replicas_equal"], run
  np.testing.assert_allclose(auto["losses"], collective["losses"], rtol=1e-6)
  np.testing.assert_allclose(auto["eval_losses"], collective["eval_losses"], rtol=1e-6)
  assert _max_diff(params("auto"), params("collective")) < 1e-5
  # Gradient accumulation inside the per-device program: the same microbatch rows, the same run.
  assert report["auto_accum"]["collectives"]["all-reduce"] == 0
  np.testing.assert_allclose(report["auto_accum"]["losses"], collective["losses"], rtol=1e-6)
  assert _max_diff(params("auto_accum"), params("collective")) < 1e-5


def test_the_step_overwrites_the_donated_state_in_place(probe):
  """XLA:CPU copies every donated optimizer moment at the start of this step unless its copy insertion analyses
  regions (jaxlm/xla_options.py); with the option there is no copy, and the steps give the same bits."""
  in_place = probe[0]["auto"]["in_place"]
  assert in_place["copies"] == 0, in_place
  assert in_place["copies_without"] > 0, in_place  # the control: the option is what removes them
  assert in_place["same_bits"], in_place


def test_auto_keeps_the_all_reduce_when_the_loss_draws_random_numbers(probe):
  """With dropout, auto stays with the all-reduce (so the masks do not depend on the device count): the same run
  bit for bit as collective. pairwise, asked for, draws each device's masks from its own key: another run."""
  report, params = probe
  auto, collective, pairwise = (report[r] for r in ("auto_dropout", "collective_dropout", "pairwise_dropout"))
  assert auto["collectives"]["all-reduce"] >= 1 and auto["collectives"]["collective-permute"] == 0
  assert auto["losses"] == collective["losses"]
  assert _max_diff(params("auto_dropout"), params("collective_dropout")) == 0.0
  assert pairwise["collectives"] == {"all-reduce": 0, "collective-permute": 2}
  assert pairwise["losses"][0] != collective["losses"][0]
  assert all(np.isfinite(pairwise["losses"])) and pairwise["losses"][-1] < pairwise["losses"][0]


def test_the_choice_on_one_device_and_bad_settings():
  mesh = sharding.make_mesh({"data": -1})  # this process: one CPU device
  assert not pairwise_sum.choose("auto", mesh) and not pairwise_sum.choose("collective", mesh)
  with pytest.raises(ValueError, match="mesh.grad_sum=pairwise cannot run here: mesh.data = 1"):
    pairwise_sum.choose("pairwise", mesh)
  with pytest.raises(ValueError, match="mesh.grad_sum='sum'"):
    pairwise_sum.choose("sum", mesh)
  c = small_config()
  c.mesh.grad_sum = "allreduce"
  assert any("mesh.grad_sum" in p for p in validate.config_problems(c)[0])
