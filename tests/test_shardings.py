"""Train-state shardings: optimizer statistics follow their parameter's axes; an axis the mesh cannot divide is
named in a warning. Runs on 4 emulated devices (fsdp=2 x model=2) in a subprocess."""
import json
import os
import subprocess
import sys

import numpy as np

from multiprocess import ROOT, device_env


def _probe(vocab, multiple):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharding_probe.py"), str(vocab), str(multiple)],
                       env=device_env(4), capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def _factored(shape):
  """optax.adafactor: (axis v_row drops, axis v_col drops): the largest and the second largest (stable order)."""
  order = np.argsort(shape, kind="stable")
  return int(order[-1]), int(order[-2])


def test_factored_statistics_keep_their_parameters_shardings_and_padding_shards_the_vocabulary():
  result = _probe(301, 128)
  specs = result["specs"]
  checked = 0
  for name, param in specs.items():
    if not name.startswith("params/"):
      continue
    rest = name[len("params/"):]
    row, col = (specs.get(f"opt_state/1/0/{which}/{rest}") for which in ("v_row", "v_col"))
    if row is None or row["shape"] == [1]:
      continue  # not factored (small or 1-D): a placeholder
    drop_row, drop_col = _factored(param["shape"])
    for state, dropped in ((row, drop_row), (col, drop_col)):
      assert state["shape"] == [d for i, d in enumerate(param["shape"]) if i != dropped], name
      assert state["spec"] == [s for i, s in enumerate(param["spec"]) if i != dropped], name
    checked += 1
  assert checked >= 4  # embedding, head, MLP in and out
  assert specs["params/head/kernel"]["spec"] == ["fsdp", "model"]  # 301 padded to 384: the vocabulary sharded
  assert specs["opt_state/1/0/v_col/head/kernel"]["spec"] == ["model"]
  assert result["warnings"] == []


def test_an_undividable_axis_is_replicated_with_a_warning_naming_the_parameter():
  result = _probe(301, 1)
  assert result["specs"]["params/head/kernel"]["spec"] == ["fsdp", None]
  assert any("params/head/kernel has a dimension of 301 that mesh axes model (2 ways) do not divide" in w
             for w in result["warnings"]), result["warnings"]
  assert not any("opt_state" in w for w in result["warnings"])  # one warning per parameter, not per statistic


def test_activations_stay_on_their_devices_rows_under_fsdp_and_model_parallelism():
  """fsdp=4 x model=2, scanned remat blocks, chunked attention and loss. With the residual stream, the heads and the
  logits constrained (sharding.constrain while the step is traced), every collective on an activation carries this
  device's 6 of the 24 rows; left to XLA's propagation the same step gathers whole-batch (or half-batch) activations
  onto a device. Both compute the single-device loss."""
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "activation_probe.py")], env=device_env(8),
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  leading = lambda variant: {int(s.split(",")[0]) for s in report[variant]["activation_collectives"]}
  assert leading("constrained") <= {6}, report["constrained"]
  assert leading("unconstrained") & {24, 12}, report["unconstrained"]  # what the constraints prevent
  for variant in ("constrained", "unconstrained"):
    assert abs(report[variant]["loss"] - report["single_device_loss"]) <= 1e-5 * report["single_device_loss"]


def test_splash_runs_on_each_devices_rows_and_heads_and_rules_shard_the_residual_stream():
  """A Pallas call is opaque to the partitioner: left to it, the splash kernel's inputs are gathered whole onto
  every device (6 all-gathers here). In the mesh's shard_map (fsdp=4 rows x model=2 heads) nothing is gathered and
  the result equals the reference. And mesh.rules reach the residual stream: mapping activation_embed to the model
  axis splits the decoder's hidden states along their width (without the residual constraint: replicated)."""
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "activation_probe.py"), "kernels"],
                       env=device_env(8), capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["all_gathers"] == 0 and report["max_error"] <= 1e-5, report
  assert report["hidden_spec"] == ["data", None, "model"], report  # rows over data (fsdp has size 1), width over model
