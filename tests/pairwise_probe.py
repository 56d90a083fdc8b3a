"""Trains a small YingGem on this process's emulated CPU devices under several mesh.grad_sum settings; prints JSON.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/pairwise_probe.py WORKDIR
Used by tests/test_pairwise_sum.py: per run, the losses, the collectives of the compiled train step, whether every
device holds the same parameter bits, and the final parameters (WORKDIR/<run>.npz); and tree_sum on its own.
"""
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxlm import pairwise_sum, sharding, trainer, xla_options
from jaxlm.metrics import read_metrics

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import small_config  # noqa: E402

RUNS = {  # name: (mesh.grad_sum, dropout, opt.grad_accum)
    "auto": ("auto", 0.0, 1),
    "collective": ("collective", 0.0, 1),
    "auto_accum": ("auto", 0.0, 2),
    "auto_dropout": ("auto", 0.1, 1),
    "collective_dropout": ("collective", 0.1, 1),
    "pairwise_dropout": ("pairwise", 0.1, 1),
}


def tree_sum_report() -> dict:
  """Each device's own f32 / bf16 / int32 values, summed by tree_sum: the sums, and whether all devices agree."""
  mesh = sharding.make_mesh({"data": -1})
  n = mesh.shape["data"]
  rng = np.random.default_rng(0)
  per_device = {"f32": rng.normal(size=(n, 1000)).astype(np.float32) * 10.0 ** rng.integers(-3, 3, (n, 1000)),
                "bf16": rng.normal(size=(n, 7, 3)).astype(jnp.bfloat16),
                "i32": rng.integers(-1000, 1000, (n, 5)).astype(np.int32)}
  summed = jax.jit(jax.shard_map(
      lambda t: jax.tree.map(lambda x: x[None], pairwise_sum.tree_sum(jax.tree.map(lambda x: x[0], t), "data", n)),
      mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False))(per_device)
  out = {}
  for k, v in jax.device_get(summed).items():
    exact = per_device[k].astype(np.float64).sum(0)
    out[k] = {"same_on_every_device": bool(all(np.array_equal(v[0].view(np.uint8), v[i].view(np.uint8))
                                                for i in range(n))),
              "max_rel_error": float(np.max(np.abs(v[0].astype(np.float64) - exact)) / np.max(np.abs(exact)))}
  return out


def entry_copies_of_arguments(hlo_text: str) -> int:
  """Copies of the program's arguments (the donated train state) at the start of the compiled step."""
  return len(re.findall(r"= \S+ copy\(%param", hlo_text[hlo_text.index("\nENTRY"):]))


def in_place_report(run, batch, lowered, compiled) -> dict:
  """The step as jaxlm compiles it (`compiled`, with xla_options.train_step) against the same `lowered` step
  without region analysis: the argument copies in each, and whether 3 steps from the same state give the same
  bits."""
  steps = {"jaxlm": compiled, "without": lowered.compile({name: False for name in xla_options.CPU_TRAIN_STEP})}
  start = jax.device_get(run.state)
  out = {}
  for name, compiled in steps.items():
    state = jax.device_put(start, run.state_sharding)
    for _ in range(3):
      state, _ = compiled(state, batch, run.base_rng)
    out[name] = (entry_copies_of_arguments(compiled.as_text()), jax.tree.leaves(jax.device_get(state)))
  return {"copies": out["jaxlm"][0], "copies_without": out["without"][0],
          "same_bits": all(np.array_equal(a, b) for a, b in zip(out["jaxlm"][1], out["without"][1]))}


def train(workdir: str, name: str) -> dict:
  grad_sum, dropout, accum = RUNS[name]
  c = small_config(model=dict(dropout=dropout), steps=6, eval_every=3, save_every=6, log_every=1,
                   batches_per_put=1)  # step_fn takes one batch (lowered below)
  c.mesh.grad_sum = grad_sum
  c.opt.grad_accum = accum
  run = trainer.Trainer(c, os.path.join(workdir, name))
  try:
    rows = c.train.batch_size, c.train.seq_len
    batch = sharding.global_batch({"inputs": np.zeros(rows, np.int32), "targets": np.zeros(rows, np.int32),
                                   "weights": np.ones(rows, np.float32)}, run.batch_sh, rows[0])
    lowered = run.step_fn.lower(run.state, batch, run.base_rng)
    compiled = lowered.compile()
    text = compiled.as_text()
    collectives = {op: len(re.findall(rf" {op}(?:-start)?\(", text)) for op in ("all-reduce", "collective-permute")}
    in_place = in_place_report(run, batch, lowered, compiled) if name == "auto" else None
    run.run()
    replicas_equal = all(
        all(np.array_equal(np.asarray(s.data), np.asarray(leaf.addressable_shards[0].data))
            for s in leaf.addressable_shards)
        for leaf in jax.tree.leaves(run.state.params))
    params = {jax.tree_util.keystr(p): np.asarray(x) for p, x in
              jax.tree_util.tree_flatten_with_path(jax.device_get(run.state.params))[0]}
    np.savez(os.path.join(workdir, name + ".npz"), **params)
    losses = [r["loss"] for r in read_metrics(os.path.join(workdir, name, "metrics.jsonl")) if "loss" in r]
    evals = [r["eval_loss"] for r in read_metrics(os.path.join(workdir, name, "metrics.jsonl")) if "eval_loss" in r]
  finally:
    run.close()
  return {"collectives": collectives, "in_place": in_place, "replicas_equal": replicas_equal, "losses": losses,
          "eval_losses": evals, "devices": jax.device_count()}


if __name__ == "__main__":
  report = {"tree_sum": tree_sum_report()}
  report.update({name: train(sys.argv[1], name) for name in RUNS})
  print(json.dumps(report))
