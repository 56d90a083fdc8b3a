"""One process of a multi-process test job (see tests/multiprocess.py): runs small trainings in order.

argv: a JSON list of tasks {"name", "family": "yinggem"|"hrm", "mesh": {...}, "train": {...}, "model": {...},
"data": {...}, "opt": {...}, "workdir",
"stop_after": steps or null}, then the optional --coordinator_address/--num_processes/--process_id flags.
Process 0 prints {name: {"losses", "evals", "step", "devices", "processes"}} as its last line.
"""
import json
import sys

from absl import flags

from jaxlm import distributed

FLAGS = flags.FLAGS
flags.DEFINE_string("coordinator_address", None, "")
flags.DEFINE_integer("num_processes", None, "")
flags.DEFINE_integer("process_id", None, "")


def hrm_config(**train):
  """A 32-wide HRM (one L and one H block, 2 ACT segments with Q-learning), sized like small_config."""
  import os
  from jaxlm.config_defaults import load_config
  from tests.multiprocess import ROOT
  c = load_config(os.path.join(ROOT, "configs", "hrm.py:tiny"))
  c.model.update(d_model=32, n_heads=2, max_seq_len=16, halt_max_steps=2)
  c.data.update(eval_batches=2)
  c.opt.update(warmup_steps=2)
  c.train.update(steps=10, batch_size=8, seq_len=16, eval_every=5, save_every=5, log_every=1, sample_tokens=0,
                 progress=False)
  c.train.update(**train)
  return c


def main():
  argv = FLAGS(sys.argv)
  tasks = json.loads(argv[1])
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  import jax
  from jaxlm import trainer
  from jaxlm.metrics import read_metrics
  from tests.test_train import small_config
  results = {}
  for task in tasks:
    c = (hrm_config if task.get("family") == "hrm" else small_config)(**task.get("train", {}))
    c.mesh.update(task.get("mesh", {}))
    c.model.update(task.get("model", {}))
    c.data.update(task.get("data", {}))
    c.opt.update(task.get("opt", {}))
    r = trainer.train_and_evaluate(c, task["workdir"], stop_after_steps=task.get("stop_after"))
    distributed.sync("mp_worker:" + task["name"])  # process 0 wrote metrics.jsonl
    rows = read_metrics(task["workdir"] + "/metrics.jsonl")
    results[task["name"]] = {"losses": [[row["step"], row["loss"]] for row in rows if "loss" in row],
                             "evals": r.eval_history, "step": r.step, "devices": jax.device_count(),
                             "processes": jax.process_count()}
  if jax.process_index() == 0:
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
  main()
