"""python -m jaxlm.train --config configs/<family>.py[:<variant>] --workdir DIR [--config.a.b=v ...]

Running the same command again resumes from DIR's latest checkpoint.
"""
import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/yinggem.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard, plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from jaxlm import trainer
  result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  status = "interrupted (resume with the same command)" if result.interrupted else (
      "stopped early" if result.stopped_early else "finished")
  print(f"{status} at step {result.step}: last train loss {result.last_loss:.4f}, "
        f"best validation loss {result.best_eval_loss:.4f}", flush=True)


if __name__ == "__main__":
  app.run(main)
