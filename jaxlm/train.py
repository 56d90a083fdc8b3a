"""python -m jaxlm.train --config configs/<family>.py[:<variant>] --workdir DIR [--config.a.b=v ...]

Running the same command again resumes from DIR's latest checkpoint. For a multi-process run, start the same
command on every host: JAX's cluster detection (TPU pod slices, SLURM, Open MPI, Kubernetes) connects them, or
add `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` to each.
"""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/yinggem.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard, plots.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0, for a multi-process run outside a detected cluster.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_bool("verbose", False, "On an error, print the traceback too (also: JAXLM_VERBOSE=1).")
flags.mark_flags_as_required(["config", "workdir"])


def unknown_overrides(argv) -> list:
  """`--config.a.b=v` overrides whose field does not exist, as 'a.b (known: ...)' strings."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv[:-1]:
    spec = argv[argv.index("--config") + 1]
  if spec is None:
    return []
  from jaxlm.config_defaults import load_config
  config = load_config(spec)
  problems = []
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0].split(".")
    node = config
    for i, key in enumerate(path):
      if not hasattr(node, "keys") or key not in node:
        known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a section)"
        problems.append(f"{'.'.join(path[:i + 1])} (known fields there: {known})")
        break
      node = node[key]
  return problems


def _train() -> int:
  from jaxlm import compile_cache, distributed, errors, host_devices, host_memory
  host_memory.keep_freed_memory()  # before the backend starts (later it has no effect on XLA:CPU's steps)
  compile_cache.enable()
  if _NUM_PROCESSES.value is None and distributed.detected_cluster() is None:  # one process: one device per core
    host_devices.configure(_CONFIG.value)
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not distributed.is_primary():  # one log for the run: the others speak only of problems
    logging.getLogger().setLevel(logging.WARNING)
  from jaxlm import trainer
  result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if distributed.is_primary():
    status = "interrupted (resume with the same command)" if result.interrupted else (
        "stopped early" if result.stopped_early else "finished")
    print(f"{status} at step {result.step}: last train loss {result.last_loss:.4f}, "
          f"best validation loss {result.best_eval_loss:.4f}", flush=True)
  return errors.EXIT_INTERRUPTED if result.interrupted else errors.EXIT_OK


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from jaxlm import errors
  code = errors.run_command(_train)
  if code == errors.EXIT_ABORTED:
    # A second Ctrl-C abandons the work in flight. Background writers (an asynchronous checkpoint save cut off
    # mid-way) may then wait forever for the interrupted main thread, and the interpreter's exit would wait for
    # them: leave without it. Anything not finalised stays a temporary directory the next run ignores.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


def run():
  from jaxlm import errors
  try:
    bad = unknown_overrides(sys.argv[1:])
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(errors.EXIT_USAGE)
  if bad:
    print("error: unknown config field(s): " + "; ".join(bad), file=sys.stderr)
    sys.exit(errors.EXIT_USAGE)
  app.run(main)


if __name__ == "__main__":
  run()
