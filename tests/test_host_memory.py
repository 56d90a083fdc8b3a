"""host_memory: with the glibc thresholds set before JAX starts, an XLA:CPU program's large temporary stays in the
heap between calls instead of being page-faulted back in at every call (what made yinggem:tiny's step on one CPU
device 51 ms instead of 36 ms)."""
import os
import subprocess
import sys

from jaxlm import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# yinggem:tiny's train step on one CPU device: XLA:CPU frees its ~50 MB of temporaries when each step ends.
PROGRAM = r"""
import resource, sys, tempfile
from jaxlm import host_memory
kept = host_memory.keep_freed_memory()
import numpy as np
from jaxlm import trainer
from jaxlm.config_defaults import load_config
c = load_config("configs/yinggem.py:tiny")
c.mesh.cpu_devices = 1
c.train.update(progress=False, batches_per_put=1)  # step_fn takes one batch
run = trainer.Trainer(c, tempfile.mkdtemp())
tokens = np.random.default_rng(0).integers(0, 65, (12, 64)).astype(np.int32)
batch = run._global({"inputs": tokens, "targets": tokens, "weights": np.ones((12, 64), np.float32)}, 12)
state = run.state
for _ in range(3):
  state, metrics = run.step_fn(state, batch, run.base_rng)
metrics["loss"].block_until_ready()
faults = []
for _ in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  state, metrics = run.step_fn(state, batch, run.base_rng)
  metrics["loss"].block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, float(np.median(faults)))
run.close()
"""


def _faults_per_call(keep: bool):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAXLM_KEEP_HEAP="1" if keep else "0",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300,
                       check=True, cwd=ROOT).stdout.split()
  return out[-2] == "True", float(out[-1])


def test_train_step_temporaries_are_not_page_faulted_back_in_at_every_step():
  kept, with_setting = _faults_per_call(keep=True)
  off, without = _faults_per_call(keep=False)
  assert kept and not off
  # Measured ~12k minor faults a step without (the temporaries' 4 KiB pages fetched again), ~3 with. The median
  # step: on a loaded machine the step sometimes runs on a pool thread whose malloc arena has not held the block
  # yet, and that one step faults it in (the mean of 10 steps was once 1.3k, the median stays ~3).
  assert without > 5000, without
  assert with_setting < without / 10, (with_setting, without)


def test_switched_off_by_the_environment(monkeypatch):
  monkeypatch.setenv("JAXLM_KEEP_HEAP", "0")
  assert host_memory.keep_freed_memory() is False
