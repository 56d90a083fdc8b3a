"""Compiles and runs one train step with fsdp x model parallelism, with and without the activation constraints.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/activation_probe.py [kernels]
Used by tests/test_shardings.py; prints JSON: per variant, the activation collectives in the compiled step (shape
strings of [rows, length or loss chunk, ...] operands) and the loss, plus the loss of the same step on one device.
"""
import functools
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import optim, sharding
from jaxlm.config_defaults import load_config
from jaxlm.models import build_model
from jaxlm.steps import TrainState, train_step

# 24 rows: a leading 24 (or 12) in a collective is the whole (half) batch on one device. An activation is told
# from a parameter by its second dimension: the sequence (48) or a loss chunk (12), sizes no parameter has.
BATCH, LENGTH, XENT_CHUNK = 24, 48, 12


def main() -> None:
  c = load_config("configs/yinggem.py:tiny")
  c.model.update(d_model=64, n_layers=2, n_heads=4, d_ff=128, vocab_size=500, vocab_multiple=128, xent_chunk=XENT_CHUNK,
                 scan_layers=True, attention_impl="chunked", attention_block=16, remat_policy="full")
  c.mesh.update(data=1, fsdp=4, model=2)
  _, module = build_model(c.model.to_dict())
  optimizer, _ = optim.make_optimizer(c.opt, 100)

  def init(rng):
    params = module.init({"params": rng}, jnp.zeros((1, 8), jnp.int32))["params"]
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params))

  window = np.random.default_rng(0).integers(0, 500, size=(BATCH, LENGTH + 1)).astype(np.int32)
  batch = {"inputs": window[:, :-1], "targets": window[:, 1:], "weights": np.ones((BATCH, LENGTH), np.float32)}
  step = functools.partial(train_step, module=module, optimizer=optimizer, grad_accum=1)
  single = jax.jit(step)(nn.unbox(init(jax.random.key(0))), batch, jax.random.key(1))[1]["loss"]
  report = {"single_device_loss": float(single)}

  mesh, rules = sharding.make_mesh(c.mesh), sharding.rules_from_config(c.mesh)
  state_sh = sharding.logical_shardings(jax.eval_shape(init, jax.random.key(0)), mesh, rules)
  batch_sh, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  for name, fn in (("constrained", sharding.tracing_with_activation_sharding(step, mesh, rules)),
                   ("unconstrained", step)):
    state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=state_sh)(jax.random.key(0))
    jitted = jax.jit(fn, in_shardings=(state_sh, batch_sh, replicated), out_shardings=(state_sh, replicated))
    sharded_batch = jax.device_put(batch, batch_sh)
    text = jitted.lower(state, sharded_batch, jax.random.key(1)).compile().as_text()
    shapes = []
    for m in re.finditer(r"= (\S+|\([^)]*\)) (?:all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                         r"(?:-start)?\(", text):
      dims = [[int(d) for d in s.split(",")] for s in re.findall(r"\w+\[([\d,]+)\]", m.group(1))]
      shapes += [",".join(map(str, d)) for d in dims if len(d) >= 3 and d[1] in (LENGTH, XENT_CHUNK)]
    loss = jitted(state, sharded_batch, jax.random.key(1))[1]["loss"]
    report[name] = {"activation_collectives": shapes, "loss": float(loss)}
  print(json.dumps(report))


def splash_on_mesh() -> None:
  """The splash kernel (interpreted) inside the mesh's shard_map: its result and whether the compiled function
  gathers q, k or v (a Pallas call left to the partitioner would run on whole, gathered arrays)."""
  from jaxlm.models import attention
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "model": 2})
  rules = sharding.DEFAULT_RULES
  b, t, n, k, h = 8, 256, 4, 2, 8
  rq, rk, rv = jax.random.split(jax.random.key(0), 3)
  q, kk, v = (jax.random.normal(r, (b, t, heads, h)) for r, heads in ((rq, n), (rk, k), (rv, k)))
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  spec = attention.MaskSpec(positions, positions, causal=True, window=100, arange_positions=True)
  fn = sharding.tracing_with_activation_sharding(
      lambda q, kk, v: attention.attend(q, kk, v, spec, impl="splash", block_q=128), mesh, rules)
  qkv_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "model", None))
  args = [jax.device_put(x, qkv_sh) for x in (q, kk, v)]
  jitted = jax.jit(fn)
  text = jitted.lower(*args).compile().as_text()
  got = jitted(*args)
  want = attention.explicit_attention(q, kk, v, spec.dense())
  return {"max_error": float(jnp.abs(got - want).max()),
          "all_gathers": len(re.findall(r" all-gather(?:-start)?\(", text))}


def residual_under_width_rules() -> dict:
  """The decoder's final hidden states when mesh.rules also map activation_embed (a name only the residual stream
  carries) to the model axis: the residual constraint splits their width (the spec of the jitted output)."""
  c = load_config("configs/yinggem.py:tiny")
  c.model.update(d_model=32, n_layers=1, n_heads=2, d_ff=64, vocab_size=64)
  _, module = build_model(c.model.to_dict())
  mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "model": 2})
  rules = sharding.DEFAULT_RULES + (("activation_embed", "model"),)
  tokens = jnp.zeros((8, 16), jnp.int32)
  params = nn.unbox(module.init(jax.random.key(0), tokens)["params"])
  hidden = jax.jit(sharding.tracing_with_activation_sharding(
      lambda p, t: module.apply({"params": p}, t, return_hidden=True)[0], mesh, rules))(params, tokens)
  return {"hidden_spec": [s if s is None or isinstance(s, str) else list(s) for s in hidden.sharding.spec]}


if __name__ == "__main__":
  import sys
  if sys.argv[1:] == ["kernels"]:
    print(json.dumps({**splash_on_mesh(), **residual_under_width_rules()}))
  else:
    main()
