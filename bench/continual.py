"""Forgetting in continual training, with and without replay (issue 13 item 6).

  python bench/continual.py [--steps 600] [--replay 0.25] [--out runs/bench_continual]

Stages, each a `python -m jaxlm.train --config configs/hrm.py:tiny` command of --steps steps:
  base       hrm:tiny on Alice + Through the Looking-Glass (the config's corpus)
  continued  base, continued on tiny Shakespeare (train.init_from; the character vocabulary grows)
  replay R   the same with data.replay=R: that share of the examples comes from the base corpus
  scratch    a new model on tiny Shakespeare alone
Every model is then evaluated here on the whole validation split of each corpus its vocabulary covers, with its
own tokenizer and the trainer's evaluation (jaxlm.steps.eval_step on the split training holds out), and the table
prints the validation losses (nats per character), the change of the Alice loss against the base model, and each
stage's wall time.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONFIG = "configs/hrm.py:tiny"
OLD, NEW = "alice+looking_glass", "tinyshakespeare"


def train(workdir: str, steps: int, env, *flags: str) -> float:
  """Runs one training stage (its log in workdir.log); returns its wall seconds."""
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, "-m", "jaxlm.train", "--config", CONFIG, "--workdir", workdir, f"--config.train.steps={steps}",
         "--config.train.progress=False", "--config.train.sample_tokens=0", "--config.train.on_new_corpus=continue",
         *flags]
  start = time.perf_counter()
  with open(workdir + ".log", "w") as log:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  if proc.returncode:
    sys.exit(f"stage failed ({proc.returncode}): {' '.join(cmd)}; see {workdir}.log")
  return time.perf_counter() - start


@functools.lru_cache(maxsize=None)
def _eval_fn(module):
  import jax
  from jaxlm import steps
  return jax.jit(functools.partial(steps.eval_step, module=module))


def val_loss(workdir: str, corpus: str, batch_size: int = 64):
  """Mean cross-entropy of `workdir`'s latest model on the validation split of `corpus` (the split and windows
  training uses), tokenized with the model's own tokenizer; None when that tokenizer lacks the corpus's
  characters."""
  import jax
  import jax.numpy as jnp
  from jaxlm import modeldir
  from jaxlm.config_defaults import load_config
  from jaxlm.data import loader, prepared, store, tokenizers
  config = load_config(os.path.join(ROOT, CONFIG))
  data = {**config.data.to_dict(), "corpus": corpus}
  _, module, params, tokenizer_dir = modeldir.load_for_inference(workdir)
  tokenizer = tokenizers.load_tokenizer(tokenizer_dir)
  from jaxlm.data import sources
  text = sources.load_text(corpus, data["text_field"], data["format"])
  if set(text) - set(tokenizer.chars):
    return None
  root = prepared.ensure(data, tokenizer=tokenizer, progress=False, tokenizer_digest=tokenizers.digest(tokenizer))
  split = loader.Split(store.TokenStore(root), data["packing"], config.train.seq_len, data["val_fraction"])
  totals = jnp.zeros((2,), jnp.float32)
  for batch in loader.EvalBatches(root, split, batch_size=batch_size):
    totals = _eval_fn(module)(params, batch, totals)
  total, weight = (float(x) for x in jax.device_get(totals))
  return total / weight


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=600, help="steps of every stage (hrm:tiny's own: 600)")
  parser.add_argument("--replay", default="0.25", help="data.replay fractions to try, comma-separated")
  parser.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_continual"))
  parser.add_argument("--json", default="", help="also write the results here")
  args = parser.parse_args()
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  env = {**os.environ, "JAXLM_DATA_CACHE": os.path.join(out, "prepared")}  # a clean cache: preparation is timed too
  os.environ.update(JAXLM_DATA_CACHE=env["JAXLM_DATA_CACHE"])
  shutil.rmtree(env["JAXLM_DATA_CACHE"], ignore_errors=True)

  base = os.path.join(out, "base")
  stages = [("base", base, [], args.steps)]
  stages.append(("continued", os.path.join(out, "continued"),
                 [f"--config.data.corpus={NEW}", f"--config.train.init_from={base}"], 2 * args.steps))
  for fraction in [float(f) for f in args.replay.split(",") if f.strip()]:
    stages.append((f"replay {fraction:g}", os.path.join(out, f"replay-{fraction:g}"),
                   [f"--config.data.corpus={NEW}", f"--config.train.init_from={base}",
                    f"--config.data.replay={fraction}"], 2 * args.steps))
  stages.append(("scratch", os.path.join(out, "scratch"), [f"--config.data.corpus={NEW}"], args.steps))

  rows = []
  for name, workdir, flags, total_steps in stages:
    wall = train(workdir, args.steps, env, *flags)
    old, new = val_loss(workdir, OLD), val_loss(workdir, NEW)
    rows.append({"stage": name, "steps": total_steps, "old_val": old, "new_val": new, "wall_s": wall})
    print(f"{name}: {wall:.0f} s, val {OLD} {old}, {NEW} {new}", flush=True)

  fmt = lambda x: "—" if x is None else f"{x:.4f}"
  base_old = rows[0]["old_val"]
  print(f"\nhrm:tiny, {args.steps} steps a stage (batch 16 x 64 characters); validation loss in nats per character\n")
  print(f"| model | steps | {OLD} val | change | {NEW} val | wall s |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  for r in rows:
    change = "" if r["old_val"] is None or r["stage"] == "base" else f"{r['old_val'] - base_old:+.4f}"
    print(f"| {r['stage']} | {r['steps']} | {fmt(r['old_val'])} | {change} | {fmt(r['new_val'])} | {r['wall_s']:.0f} |")
  scratch = rows[-1]["new_val"]
  for r in rows[1:-1]:
    print(f"{r['stage']}: {NEW} val {r['new_val'] - scratch:+.4f} against scratch; "
          f"{OLD} val {r['old_val'] - base_old:+.4f} against base")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"steps": args.steps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
