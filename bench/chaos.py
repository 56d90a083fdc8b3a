"""Chaos rounds against a tiny training run: kill -9, SIGTERM and damaged checkpoints at random moments.

  python bench/chaos.py [--rounds 12] [--seed 0] [--steps 300] [--out runs/chaos]

Each round starts (or resumes) the same `python -m jaxlm.train` command, lets it train for a random while, then
does one thing to it: kill -9 (at any moment, saves in flight included), SIGTERM (must save and exit 75), or
kill -9 followed by damage to the newest checkpoint (truncated or bit-flipped array file, deleted state/ or
manifest, garbage metadata, a wrong recorded checksum). The next round must resume from a checkpoint that
restores (falling back past a damaged one). After the rounds the run is finished and its metrics are compared
with an uninterrupted run of the same command. Prints one line per round and a summary: rounds, rounds
survived, whether the final trajectory equals the uninterrupted one (max |loss difference|).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = [sys.executable, "-m", "jaxlm.train", "--config", os.path.join(ROOT, "configs", "yinggem.py:tiny"),
           "--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
           "--config.model.d_ff=64", "--config.train.eval_every=0", "--config.train.sample_tokens=0",
           "--config.train.progress=False", "--config.train.log_every=1", "--config.train.save_every=3",
           "--config.train.keep_checkpoints=3"]


# ------------------------------------------------------------------------------------- ways to damage a checkpoint
def _array_file(step_dir: str) -> str:
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
           if os.path.basename(d) == "d"]
  return max(files, key=os.path.getsize)


def truncate_array_file(step_dir: str) -> None:
  path = _array_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def flip_two_bytes(step_dir: str) -> None:
  path = _array_file(step_dir)
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    for i in (len(data) // 3, len(data) // 2):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(bytes(data))


def delete_state(step_dir: str) -> None:
  shutil.rmtree(os.path.join(step_dir, "state"))


def delete_manifest(step_dir: str) -> None:
  os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


def garbage_metadata(step_dir: str) -> None:
  with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
    f.write("{not json")


def wrong_checksum(step_dir: str) -> None:
  """The arrays stay readable but differ from what the metadata says was written: only the checksum can tell."""
  path = os.path.join(step_dir, "meta", "metadata")
  with open(path) as f:
    meta = json.load(f)
  name = next(k for k in meta["checksums"] if k.startswith("params/"))
  meta["checksums"][name] = [meta["checksums"][name][0] + 1, meta["checksums"][name][1]]
  with open(path, "w") as f:
    json.dump(meta, f)


DAMAGE = {"truncated array file": truncate_array_file, "two flipped bytes": flip_two_bytes,
          "state/ deleted": delete_state, "manifest.ocdbt deleted": delete_manifest,
          "garbage metadata": garbage_metadata, "checksum mismatch": wrong_checksum}


# ------------------------------------------------------------------------------------- rounds
def _losses(workdir: str) -> dict:
  path = os.path.join(workdir, "metrics.jsonl")
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _latest_step(workdir: str):
  d = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
  return max(steps) if steps else None


def _wait_rows(workdir: str, proc, more: int, timeout: float = 300) -> bool:
  start_rows, deadline = len(_losses(workdir)), time.time() + timeout
  while len(_losses(workdir)) < start_rows + more:
    if proc.poll() is not None or time.time() > deadline:
      return False
    time.sleep(0.05)
  return True


def chaos_round(workdir: str, steps: int, rng: random.Random) -> tuple:
  """(action, survived, detail) of one round."""
  action = rng.choice(["kill -9", "SIGTERM", "damage"])
  proc = subprocess.Popen(COMMAND + [f"--config.train.steps={steps}", "--workdir", workdir], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  if not _wait_rows(workdir, proc, rng.randint(2, 12)):
    _, err = proc.communicate()
    finished = proc.returncode == 0
    return action, finished, "finished before the action" if finished else f"exit {proc.returncode}: {err[-300:]}"
  time.sleep(rng.uniform(0.0, 0.3))
  if action == "SIGTERM":
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    ok = proc.returncode in (75, 0)
    return action, ok, f"exit {proc.returncode}, latest checkpoint {_latest_step(workdir)}" + ("" if ok else err[-300:])
  proc.kill()
  proc.communicate()
  latest = _latest_step(workdir)
  if action == "kill -9":
    return action, True, f"latest checkpoint {latest}"
  kind = rng.choice(sorted(DAMAGE))
  if latest is None:
    return action, True, "no checkpoint yet to damage"
  DAMAGE[kind](os.path.join(workdir, "checkpoints", str(latest)))
  return f"damage ({kind})", True, f"damaged checkpoint {latest}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=12)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--out", default=os.path.join(ROOT, "runs", "chaos"))
  args = parser.parse_args(argv)
  rng = random.Random(args.seed)
  shutil.rmtree(args.out, ignore_errors=True)
  chaos_dir, reference_dir = os.path.join(args.out, "chaos"), os.path.join(args.out, "reference")

  survived = 0
  for i in range(args.rounds):
    action, ok, detail = chaos_round(chaos_dir, args.steps, rng)
    survived += ok
    print(f"round {i + 1:2d}: {action:32s} {'survived' if ok else 'FAILED'}  ({detail})", flush=True)
  final = subprocess.run(COMMAND + [f"--config.train.steps={args.steps}", "--workdir", chaos_dir], cwd=ROOT,
                         capture_output=True, text=True)
  corrupt = os.path.join(chaos_dir, "corrupt")
  print(f"final resume: exit {final.returncode}; damaged checkpoints set aside: "
        f"{sorted(os.listdir(corrupt)) if os.path.isdir(corrupt) else []}")
  subprocess.run(COMMAND + [f"--config.train.steps={args.steps}", "--workdir", reference_dir], cwd=ROOT,
                 capture_output=True, check=True)
  got, want = _losses(chaos_dir), _losses(reference_dir)
  same_steps = sorted(got) == sorted(want) == list(range(1, args.steps + 1))
  diff = max((abs(got[s] - want[s]) for s in want if s in got), default=float("nan"))
  equal = final.returncode == 0 and same_steps and diff <= 1e-6
  print(f"rounds {args.rounds}, survived {survived}, final trajectory equals the uninterrupted run: {equal} "
        f"(steps 1..{args.steps} each logged once: {same_steps}; max |loss difference| {diff:.2e})")
  return 0 if equal and survived == args.rounds else 1


if __name__ == "__main__":
  sys.exit(main())
