"""jaxlm's `configs/yinggem.py:tiny` run against the nanoGPT-recipe PyTorch peer, side by side.

  python bench/train_tiny.py [--steps 2000] [--threads 2] [--out runs/bench_train_tiny]

Runs the peer (bench/nanogpt_peer.py) and then `python -m jaxlm.train --config configs/yinggem.py:tiny`, each in
its own process on the same cores, and prints for both: end-to-end wall-clock seconds of the whole command (imports,
compilation, evaluations, checkpoints and the final sample included), tokens/s of the training loop, and the
final validation loss over the whole held-out split. The ratio line compares jaxlm with the peer.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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


def run_jaxlm(steps, out):
  workdir = os.path.join(out, "jaxlm")
  shutil.rmtree(workdir, ignore_errors=True)
  wall, _ = _timed([sys.executable, "-m", "jaxlm.train", "--config", "configs/yinggem.py:tiny", "--workdir", workdir,
                    f"--config.train.steps={steps}", "--config.train.progress=False"])
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [r for r in rows if "tokens_per_sec" in r][1:]  # the first window includes compilation
  evals = [r for r in rows if "eval_loss" in r]
  tps = sum(r["tokens_per_sec"] for r in train) / max(len(train), 1)
  return {"wall_s": wall, "tokens_per_sec": tps, "val_loss": evals[-1]["eval_loss"] if evals else float("nan"),
          "evals": [(r["step"], r["eval_loss"], r["elapsed_s"]) for r in evals]}


def first_below(evals, target):
  """(step, seconds since the run started) of the first evaluation at or below target, or None."""
  return next(((step, t) for step, loss, t in evals if loss <= target), None)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--steps", type=int, default=2000)
  ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the peer; XLA "
                  "uses every core")
  ap.add_argument("--target", type=float, default=1.88, help="validation loss nanoGPT's README quotes")
  ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_train_tiny"))
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  peer = run_peer(args.steps, args.threads, args.out)
  ours = run_jaxlm(args.steps, args.out)
  print(f"{'':22s}{'wall s':>10s}{'train tok/s':>14s}{'val loss':>10s}")
  for name, r in (("nanoGPT recipe (torch)", peer), ("jaxlm yinggem:tiny", ours)):
    print(f"{name:22s}{r['wall_s']:10.1f}{r['tokens_per_sec']:14,.0f}{r['val_loss']:10.4f}")
  print(f"ratio jaxlm/peer: wall {ours['wall_s'] / peer['wall_s']:.2f}x, "
        f"tokens/s {ours['tokens_per_sec'] / peer['tokens_per_sec']:.2f}x, "
        f"val loss {ours['val_loss'] - peer['val_loss']:+.4f}")
  for target in (args.target, peer["val_loss"]):
    hit = first_below(ours["evals"], target)
    where = f"at step {hit[0]}, {hit[1]:.1f} s after the run started" if hit else "not reached"
    print(f"jaxlm validation loss <= {target:.4f}: {where} (peer: {peer['val_loss']:.4f} after "
          f"{args.steps} steps, {peer['wall_s']:.1f} s)")
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump({"peer": peer, "jaxlm": ours, "steps": args.steps, "threads": args.threads}, f, indent=2)


if __name__ == "__main__":
  main()
