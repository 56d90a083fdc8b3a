"""nanoGPT's CPU Shakespeare recipe (PyTorch peer) against jaxlm's `yinggem:tiny` and `yinggem:speedrun`, side by side.

  python bench/train_tiny.py [--steps 2000] [--threads 2] [--target 1.88] [--repeats 1] [--out runs/bench_train_tiny]

Runs the peer (bench/nanogpt_peer.py, nanoGPT's recipe), then `python -m jaxlm.train --config configs/yinggem.py:tiny`
(the same recipe), --repeats times in turn, then `configs/yinggem.py:speedrun` twice: with an empty compilation
cache (cold) and again (warm: JAX's persistent cache, on by default, holds its compiled programs). Each command
runs in its own process on the same cores, one after the other. For each it prints: wall seconds from the
command's start to the first validation loss <= --target on the whole validation split (or never), the final
whole-split validation loss, end-to-end wall seconds (imports, compilation, data, evaluations, checkpoints, the
final sample), training tokens/s, and the ratios against the peer. On a shared machine the speed of both drifts
by 10-20% within minutes: with --repeats > 1 each tokens/s ratio is taken within its own pair (peer, then tiny)
and the median is printed; the time-to-target ratios are taken against the fastest peer run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timed(cmd, env=None):
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - start
  if proc.returncode:
    sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
  return wall, proc.stdout


def run_peer(steps, threads, out):
  path = os.path.join(out, "peer.json")
  wall, _ = _timed([sys.executable, "bench/nanogpt_peer.py", "--steps", str(steps), "--threads", str(threads),
                    "--json", path])
  with open(path) as f:
    summary = json.load(f)
  return {"wall_s": wall, "tokens_per_sec": summary["tokens_per_s"], "val_loss": summary["val_loss_full"],
          "train_loop_s": summary["train_seconds"]}


def run_jaxlm(config, out, name, steps=None, env=None):
  workdir = os.path.join(out, name)
  shutil.rmtree(workdir, ignore_errors=True)
  start = time.time()
  wall, _ = _timed([sys.executable, "-m", "jaxlm.train", "--config", config, "--workdir", workdir,
                    "--config.train.progress=False"] + ([f"--config.train.steps={steps}"] if steps else []), env=env)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [r for r in rows if "tokens_per_sec" in r][1:]  # the first window includes compilation
  full = [r for r in rows if "eval_loss" in r and r.get("eval_full", True)]  # whole validation split
  tps = sum(r["tokens_per_sec"] for r in train) / max(len(train), 1)
  return {"wall_s": wall, "tokens_per_sec": tps, "val_loss": full[-1]["eval_loss"] if full else float("nan"),
          "steps": rows[-1]["step"] if rows else 0,
          "evals": [(r["step"], r["eval_loss"], r["time"] - start) for r in full]}


def first_below(evals, target):
  """(step, seconds since the run started) of the first evaluation at or below target, or None."""
  return next(((step, t) for step, loss, t in evals if loss <= target), None)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--steps", type=int, default=2000, help="steps of the peer and of yinggem:tiny")
  ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the peer; XLA "
                  "uses every core")
  ap.add_argument("--target", type=float, default=1.88, help="validation loss nanoGPT's README quotes")
  ap.add_argument("--repeats", type=int, default=1, help="pairs of (peer, yinggem:tiny) runs, in turn")
  ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_train_tiny"))
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  # Each jaxlm configuration starts with empty caches (compiled programs, prepared data): the first run pays for
  # compiling and tokenizing, as a first run on a new machine would; the warm rerun is the same command again.
  caches = {}
  for name in ("tiny", "speedrun"):
    caches[name] = {"JAXLM_COMPILATION_CACHE": os.path.join(args.out, f"xla-cache-{name}"),
                    "JAXLM_DATA_CACHE": os.path.join(args.out, f"data-cache-{name}")}
    for path in caches[name].values():
      shutil.rmtree(path, ignore_errors=True)
  speedrun_env = {**os.environ, **caches["speedrun"]}
  runs, pairs = [], []
  for i in range(args.repeats):
    tag = f" #{i + 1}" if args.repeats > 1 else ""
    peer = run_peer(args.steps, args.threads, args.out)
    peer["evals"] = [(args.steps, peer["val_loss"], peer["wall_s"])]  # the whole split once, at its end
    tiny = run_jaxlm("configs/yinggem.py:tiny", args.out, "tiny", args.steps, env={**os.environ, **caches["tiny"]})
    runs += [("nanoGPT recipe (torch)" + tag, peer), ("jaxlm yinggem:tiny" + tag, tiny)]
    pairs.append((peer, tiny))
  runs.append(("jaxlm speedrun, cold", run_jaxlm("configs/yinggem.py:speedrun", args.out, "speedrun", env=speedrun_env)))
  runs.append(("jaxlm speedrun, warm", run_jaxlm("configs/yinggem.py:speedrun", args.out, "speedrun", env=speedrun_env)))
  print(f"\n| run | steps | s to val <= {args.target} | final val loss | wall s | train tokens/s |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  for name, r in runs:
    hit = first_below(r["evals"], args.target)
    r["reached_s"] = None if hit is None else hit[1]
    steps = r.get("steps", args.steps)
    print(f"| {name} | {steps} | {'never' if hit is None else f'{hit[1]:.1f}'} | {r['val_loss']:.4f} | "
          f"{r['wall_s']:.1f} | {r['tokens_per_sec']:,.0f} |")
  ratios = [tiny["tokens_per_sec"] / peer["tokens_per_sec"] for peer, tiny in pairs]
  peer, tiny = pairs[0]
  print(f"\nyinggem:tiny / peer: tokens/s {', '.join(f'{r:.2f}x' for r in ratios)}"
        + (f" (median {statistics.median(ratios):.2f}x)" if len(ratios) > 1 else "")
        + f", wall {tiny['wall_s'] / peer['wall_s']:.2f}x, val loss {tiny['val_loss'] - peer['val_loss']:+.4f}")
  fastest_peer = min(p["wall_s"] for p, _ in pairs)
  for name, r in runs:
    if r["reached_s"] is not None:
      print(f"{name}: val <= {args.target} after {r['reached_s']:.1f} s = {r['reached_s'] / fastest_peer:.2f}x "
            f"the peer's end-to-end {fastest_peer:.1f} s" + (" (its fastest run)" if len(pairs) > 1 else ""))
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump({"runs": dict(runs), "steps": args.steps, "threads": args.threads, "target": args.target,
               "tokens_per_sec_ratios": ratios}, f, indent=2)


if __name__ == "__main__":
  main()
