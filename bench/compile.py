"""Compile time of the full-size YingGem train step at 4, 12 and 24 layers, blocks unrolled vs model.scan_layers.

  python bench/compile.py                       # YingGem width (768, 12 heads, GPT-2 vocabulary), batch 1 x 256
  python bench/compile.py --config optimus_prime --layers 4,8,16

Each point is a fresh process (no compilation cache), timing jax.jit(train_step).lower(...).compile() of the
config's own optimizer and model with n_layers changed. Goal (issue 11): 24 layers <= 1.5 x 4 layers with scan.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memory  # noqa: E402  (bench/memory.py: config loading)


def worker(config_name: str, layers: int, scan: bool, batch: int, length: int) -> dict:
  import functools

  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from jaxlm import optim
  from jaxlm.models.config_base import build_model
  from jaxlm.steps import TrainState, train_step

  config = memory._config(config_name, [f"model.n_layers={layers}", f"model.scan_layers={str(scan).lower()}"])
  if isinstance(config.model.get("attention_window"), (tuple, list)):
    config.model.attention_window = 0
  _, module = build_model(config.model.to_dict())
  optimizer, _ = optim.make_optimizer(config.opt, 100)

  def init(rng):
    params = nn.unbox(module.init({"params": rng}, jnp.zeros((1, length), jnp.int32))["params"])
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params))

  state = jax.eval_shape(init, jax.random.key(0))
  batch_spec = {"inputs": jax.ShapeDtypeStruct((batch, length), jnp.int32),
                "targets": jax.ShapeDtypeStruct((batch, length), jnp.int32),
                "weights": jax.ShapeDtypeStruct((batch, length), jnp.float32)}
  step = jax.jit(functools.partial(train_step, module=module, optimizer=optimizer, grad_accum=1))
  start = time.perf_counter()
  lowered = step.lower(state, batch_spec, jax.random.key(1))
  lowered_s = time.perf_counter() - start
  lowered.compile()
  return {"lower_s": lowered_s, "compile_s": time.perf_counter() - start, "hlo_chars": len(lowered.as_text())}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="yinggem")
  parser.add_argument("--layers", default="4,12,24")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args.config, int(args.worker[0]), args.worker[1] == "scan", args.batch, args.length)))
    return 0
  env = dict(os.environ, PYTHONPATH=memory.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_ENABLE_COMPILATION_CACHE="false")
  results = {}
  print(f"{args.config}, batch {args.batch} x {args.length}: seconds to trace+lower+compile the train step")
  print(f"{'layers':>6s} {'unrolled':>10s} {'scanned':>10s}   program text (unrolled / scanned)")
  for layers in map(int, args.layers.split(",")):
    row = {}
    for mode in ("unrolled", "scan"):
      out = subprocess.run([sys.executable, os.path.abspath(__file__), "--config", args.config, "--batch",
                            str(args.batch), "--length", str(args.length), "--worker", str(layers), mode],
                           capture_output=True, text=True, env=env)
      if out.returncode:
        raise SystemExit(out.stderr[-2000:])
      row[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    results[layers] = row
    print(f"{layers:6d} {row['unrolled']['compile_s']:9.1f}s {row['scan']['compile_s']:9.1f}s   "
          f"{row['unrolled']['hlo_chars']:,} / {row['scan']['hlo_chars']:,}", flush=True)
  first, last = min(results), max(results)
  for mode, label in (("unrolled", "unrolled"), ("scan", "scanned")):
    ratio = results[last][mode]["compile_s"] / results[first][mode]["compile_s"]
    print(f"{label}: {last} layers / {first} layers = {ratio:.2f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
