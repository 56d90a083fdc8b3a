"""Shardings of a small YingGem train state under Adafactor on this process's devices; prints JSON.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharding_probe.py VOCAB VOCAB_MULTIPLE
Used by tests/test_shardings.py (specs of parameters and their factored statistics, and the logged warnings).
"""
import json
import logging
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import optim, sharding
from jaxlm.config_defaults import load_config
from jaxlm.models import build_model
from jaxlm.steps import TrainState


def main(vocab: int, multiple: int) -> None:
  warnings = []
  handler = logging.Handler()
  handler.emit = lambda record: warnings.append(record.getMessage())
  logging.getLogger("jaxlm.sharding").addHandler(handler)
  c = load_config("configs/yinggem.py")
  c.model.update(d_model=256, n_layers=1, n_heads=4, d_ff=256, vocab_size=vocab, vocab_multiple=multiple)
  c.mesh.update(data=1, fsdp=2, model=2)
  _, module = build_model(c.model.to_dict())
  optimizer, _ = optim.make_optimizer(c.opt, 100)

  def init(rng):
    params = module.init({"params": rng}, jnp.zeros((1, 8), jnp.int32))["params"]
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params))

  boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.logical_shardings(boxed, sharding.make_mesh(c.mesh), sharding.rules_from_config(c.mesh))
  specs = {}
  for (path, sh), (_, x) in zip(jax.tree_util.tree_flatten_with_path(shardings)[0],
                                jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]):
    specs[sharding._param_path(path)] = {"shape": list(x.shape), "spec": [s if s is None or isinstance(s, str)
                                                                          else list(s) for s in sh.spec]}
  print(json.dumps({"specs": specs, "warnings": warnings}))


if __name__ == "__main__":
  main(*map(int, sys.argv[1:]))
