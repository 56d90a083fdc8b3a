"""Gradient accumulation keeps every device on its own rows (8 emulated devices, in a subprocess).

The microbatches are a strided split of the batch (steps.split_microbatches) pinned to the batch's sharding, so
with a global batch of 16 on 8 data-parallel devices and 2 microbatches each device computes 1 row of each
microbatch and nothing is gathered. The contiguous split it replaced compiled to 3 all-gathers of the batch and
2 rows per device per microbatch (each microbatch on half the devices).
"""
import json
import os
import subprocess
import sys

from multiprocess import ROOT, device_env


def test_compiled_step_moves_no_batch_rows_between_devices():
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "accum_probe.py"), "16", "32"],
                       env=device_env(8), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  whole, split = report["1"], report["2"]
  assert split["devices"] == 8
  for r in (whole, split):
    assert r["collectives"]["all-gather"] == r["collectives"]["all-to-all"] == 0, r
    assert r["collectives"]["collective-permute"] == 0, r
    assert r["collectives"]["all-reduce"] >= 1, r  # the gradient (and loss) sums: the only communication
  assert "1" in split["id_rows"], split  # token ids of one row per device per microbatch (16 / 2 / 8)
  assert "1" not in whole["id_rows"]
  assert abs(split["loss"] - whole["loss"]) <= 1e-6 * abs(whole["loss"])
