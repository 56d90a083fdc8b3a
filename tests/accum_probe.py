"""Compiles (and runs) one train step on the emulated devices of this process; prints JSON about it.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/accum_probe.py
Used by tests/test_grad_accum_sharding.py: the collectives in the compiled step, and its loss for grad_accum 1/2.
"""
import functools
import json
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import optim, sharding
from jaxlm.config_defaults import base_config
from jaxlm.models.config_base import build_model
from jaxlm.steps import TrainState, train_step


def main(batch: int = 16, length: int = 32) -> None:
  mesh = sharding.make_mesh({"data": -1})
  _, module = build_model(dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64))
  optimizer, _ = optim.make_optimizer(base_config().opt, 10)
  params = nn.unbox(module.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))["params"])
  replicated = sharding.replicated(mesh)
  state = jax.device_put(TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params)), replicated)
  window = np.random.default_rng(0).integers(0, 64, size=(batch, length + 1)).astype(np.int32)
  batch_sh = sharding.batch_sharding(mesh)
  data = {k: jax.device_put(v, batch_sh) for k, v in
          {"inputs": window[:, :-1], "targets": window[:, 1:], "weights": np.ones((batch, length), np.float32)}.items()}
  report = {}
  for accum in (1, 2):
    step = jax.jit(functools.partial(train_step, module=module, optimizer=optimizer, grad_accum=accum,
                                     microbatch_sharding=sharding.microbatch_sharding(mesh)),
                   in_shardings=(replicated, batch_sh, replicated), out_shardings=(replicated, replicated))
    compiled = step.lower(state, data, jax.random.key(1)).compile()
    text = compiled.as_text()
    collectives = {op: len(re.findall(rf" {op}(?:-start)?\(", text))
                   for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce")}
    # The embedding lookup's token ids: their per-device shape shows each device's rows per microbatch.
    ids = sorted(set(re.findall(r"s32\[(\d+),%d\]" % length, text)))
    _, metrics = compiled(state, data, jax.random.key(1))
    report[accum] = {"collectives": collectives, "id_rows": ids, "loss": float(metrics["loss"]),
                     "devices": jax.device_count()}
  print(json.dumps(report))


if __name__ == "__main__":
  main(*map(int, sys.argv[1:]))
