"""Data pipeline at scale: python bench/data.py [--sizes_mb 100,1000] [--dir /tmp/jaxlm-bench-data]

For each size it generates a JSONL corpus of random-word documents (C4-like lengths), then measures, each in
a fresh process:
  prepare   `python -m jaxlm.prepare` (yinggem:tiny's char tokenizer): wall time, tokens/s, peak RSS of the
            process tree (main process + tokenizer workers, sampled every 0.1 s);
  open      opening the prepared dataset and reading the first training batch (what training start-up adds;
            the Python imports are timed apart);
  loader    tokens/s the Grain loader delivers at yinggem:tiny's batch shape, and its peak RSS;
  train     `python -m jaxlm.train --config configs/yinggem.py:tiny` for a few steps on it: seconds to the first
            logged step (compilation included), tokens/s the tiny model consumes, peak RSS.
The issue's goals: prepare and train RSS <= 1 GiB at every size, start-up <= 10 s at 1 GB, loader >= 10x the
model's tokens/s.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "yinggem.py:tiny")


def generate(path: str, size_mb: int, seed: int = 0) -> str:
  """Documents of 50-1500 random words from a 20k-word vocabulary, written until `size_mb` MB."""
  if os.path.isfile(path) and os.path.getsize(path) >= size_mb << 20:
    return path
  rng = np.random.default_rng(seed)
  letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
  vocab = ["".join(rng.choice(letters, size=int(rng.integers(2, 9)))) for _ in range(20000)]
  target, written = size_mb << 20, 0
  tmp = path + ".partial"
  with open(tmp, "w", encoding="utf-8") as f:
    while written < target:
      lines = []
      for n in rng.integers(50, 1500, size=256):
        words = rng.choice(len(vocab), size=int(n))
        lines.append(json.dumps({"text": " ".join(vocab[w] for w in words) + "."}) + "\n")
      block = "".join(lines)
      f.write(block)
      written += len(block)
  os.replace(tmp, path)
  return path


def run_measured(cmd, env=None):
  """(wall s, peak RSS of the process tree in MiB, stdout) of a command."""
  started = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
  peak = [0]

  def sample():
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
      try:
        tree = [ps] + ps.children(recursive=True)
        peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree if p.is_running()))
      except psutil.Error:
        pass
      time.sleep(0.1)
  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  out, _ = proc.communicate()
  wall = time.perf_counter() - started
  sampler.join()
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
  return wall, peak[0] / 2**20, out


LOADER_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from jaxlm.config_defaults import load_config
from jaxlm.data import pipeline, prepared, store
imports = time.perf_counter() - t0
t0 = time.perf_counter()
cfg = load_config(sys.argv[1]); cfg.data.corpus = sys.argv[2]; cfg.data.cache_dir = sys.argv[3]
root = prepared.find(cfg.data)
tok = prepared.load_tokenizer(root)
data = pipeline.build_prepared_data(root, cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
                                    seed=0, tokenizer=tok)
next(data.train_iter)
startup = time.perf_counter() - t0
n, t1 = int(sys.argv[4]), time.perf_counter()
for _ in range(n):
  next(data.train_iter)
rate = n * cfg.train.batch_size * cfg.train.seq_len / (time.perf_counter() - t1)
print(json.dumps({"imports_s": imports, "startup_s": startup, "loader_tokens_per_s": rate, "train_tokens": data.train_tokens}))
"""


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes_mb", default="100,1000")
  parser.add_argument("--dir", default="/tmp/jaxlm-bench-data")
  parser.add_argument("--loader_batches", type=int, default=2000)
  parser.add_argument("--train_steps", type=int, default=60)
  parser.add_argument("--keep", action="store_true", help="reuse prepared datasets from an earlier run")
  args = parser.parse_args()
  os.makedirs(args.dir, exist_ok=True)
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  rows = []
  for size in [int(s) for s in args.sizes_mb.split(",")]:
    corpus = generate(os.path.join(args.dir, f"corpus-{size}mb.jsonl"), size)
    cache = os.path.join(args.dir, "cache")
    over = [f"--config.data.corpus={corpus}", f"--config.data.cache_dir={cache}"]
    if not args.keep:
      shutil.rmtree(cache, ignore_errors=True)
    wall, rss, out = run_measured([sys.executable, "-m", "jaxlm.prepare", f"--config={CONFIG}", *over], env)
    root = out.strip().splitlines()[-2].rsplit(": ", 1)[-1] if "prepared " in out else None
    meta = json.load(open(os.path.join(root, "jaxlm.json"))) if root else {}
    _, loader_rss, out = run_measured([sys.executable, "-c", LOADER_CHILD, CONFIG, corpus, cache,
                                       str(args.loader_batches)], env)
    loader = json.loads(out.strip().splitlines()[-1])
    workdir = os.path.join(args.dir, f"train-{size}mb")
    shutil.rmtree(workdir, ignore_errors=True)
    log_every = max(1, args.train_steps // 3)
    _, train_rss, _ = run_measured([sys.executable, "-m", "jaxlm.train", f"--config={CONFIG}", f"--workdir={workdir}",
                                    *over, f"--config.train.steps={args.train_steps}", "--config.train.eval_every=0",
                                    f"--config.train.log_every={log_every}", "--config.train.sample_tokens=0",
                                    "--config.train.progress=False", f"--config.train.save_every={args.train_steps}"],
                                   env)
    metrics = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if '"loss"' in l]
    model_rate = float(np.median([m["tokens_per_sec"] for m in metrics[1:]] or [metrics[0]["tokens_per_sec"]]))
    row = {"size_mb": size, "tokens": meta.get("tokens"), "documents": meta.get("documents"),
           "prepare_s": round(wall, 1), "prepare_tokens_per_s": round(meta.get("tokens", 0) / wall),
           "prepare_peak_rss_mib": round(rss), "workers": meta.get("workers"),
           "imports_s": round(loader["imports_s"], 2), "open_and_first_batch_s": round(loader["startup_s"], 3),
           "loader_tokens_per_s": round(loader["loader_tokens_per_s"]), "loader_peak_rss_mib": round(loader_rss),
           "train_first_log_s": round(metrics[0]["elapsed_s"], 1), "model_tokens_per_s": round(model_rate),
           "loader_over_model": round(loader["loader_tokens_per_s"] / model_rate, 1),
           "train_peak_rss_mib": round(train_rss)}
    rows.append(row)
    print(json.dumps(row), flush=True)
  keys = list(rows[0])
  print("\n" + " | ".join(keys))
  for row in rows:
    print(" | ".join(str(row[k]) for k in keys))


if __name__ == "__main__":
  main()
