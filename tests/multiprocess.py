"""Launching small training jobs as 1 or several local JAX processes (CPU devices, gloo collectives).

`run_tasks(tasks, processes=2, devices=4)` starts `processes` copies of tests/mp_worker.py connected through
jax.distributed on localhost, each with `devices` emulated CPU devices, runs the tasks in order in each of them
and returns process 0's results: {task name: {"losses", "evals", "step"}}.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "mp_worker.py")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# Launches of the same program on the same topology share compiled executables through JAX's persistent cache.
COMPILE_CACHE = os.path.join(tempfile.gettempdir(), f"jaxlm-test-compile-cache-{os.getuid()}")


def device_env(devices: int) -> dict:
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
              PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
              JAX_COMPILATION_CACHE_DIR=COMPILE_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def distributed_flags(port: int, processes: int, index: int) -> list:
  return [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}", f"--process_id={index}"]


def start(cmds, env, cwd=ROOT):
  return [subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for cmd in cmds]


def finish(procs, timeout: float = 600, expect_rc: int = 0) -> list:
  """Waits for every process; if one exits with another code than `expect_rc` or time runs out, kills the
  others (they would wait for it at the next collective) and raises with the outputs."""
  deadline = time.time() + timeout
  outputs = [None] * len(procs)
  while any(o is None for o in outputs):
    for i, p in enumerate(procs):
      if outputs[i] is None and p.poll() is not None:
        outputs[i] = p.stdout.read()
        if p.returncode != expect_rc:
          for q in procs:
            q.kill()
          raise AssertionError(f"process {i} exited with {p.returncode}:\n{outputs[i][-4000:]}")
    if time.time() > deadline:
      for q in procs:
        q.kill()
      raise AssertionError("processes timed out:\n" + "\n----\n".join((p.stdout.read() or "")[-2000:] for p in procs))
    time.sleep(0.1)
  return outputs


def run_tasks(tasks, processes: int = 1, devices: int = 8, timeout: float = 600) -> dict:
  job = json.dumps(tasks)
  port = free_port()
  cmds = [[sys.executable, WORKER, job] + (distributed_flags(port, processes, i) if processes > 1 else [])
          for i in range(processes)]
  outputs = finish(start(cmds, device_env(devices)), timeout)
  return json.loads(outputs[0].strip().splitlines()[-1])
