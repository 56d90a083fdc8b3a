"""Data-parallel gradient sums by pairwise exchanges, for several XLA:CPU devices in one process (`mesh.grad_sum`).

The default (`jax.jit` over a data-parallel mesh) lets XLA insert one all-reduce of every gradient array. XLA:CPU's
in-process all-reduce meets the devices at a rendezvous once per array and adds with a scalar loop: yinggem:tiny's
~55 gradient arrays cost ~7 ms of a ~35 ms step on 2 devices. Here each device computes the sums of its own rows in
a shard_map, the sums are flattened into one vector per dtype and added across devices by recursive doubling:
log2(n) collective permutes (a memcpy on XLA:CPU), each followed by `x + partner's x`. Float addition is commutative,
so both partners of an exchange hold the same bits after it, and every device ends with the same sum: the
parameters stay replicated bit for bit.
"""
from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxlm import sharding

log = logging.getLogger(__name__)

CHOICES = ("auto", "collective", "pairwise")


def butterfly_sum(x_N: jax.Array, axis_name: str, n_devices: int) -> jax.Array:
  """x summed over the `n_devices` (a power of two) of `axis_name`, identical bits on every device."""
  stride = 1
  while stride < n_devices:
    partner = [(i, i ^ stride) for i in range(n_devices)]
    x_N = x_N + jax.lax.ppermute(x_N, axis_name, partner)
    stride *= 2
  return x_N


def tree_sum(tree, axis_name: str, n_devices: int):
  """Every leaf of `tree` summed over `axis_name`: one flat vector, one butterfly per dtype."""
  leaves, treedef = jax.tree.flatten(tree)
  summed = [None] * len(leaves)
  for dtype in sorted({leaf.dtype for leaf in leaves}, key=str):
    where = [i for i, leaf in enumerate(leaves) if leaf.dtype == dtype]
    flat = butterfly_sum(jnp.concatenate([jnp.ravel(leaves[i]) for i in where]), axis_name, n_devices)
    offset = 0
    for i in where:
      size = int(np.prod(leaves[i].shape))
      summed[i] = flat[offset:offset + size].reshape(leaves[i].shape)
      offset += size
  return jax.tree.unflatten(treedef, summed)


def unsupported(mesh: Mesh) -> str | None:
  """Why the pairwise sum cannot run on `mesh`, or None when it can."""
  n_data = mesh.shape["data"]
  if mesh.devices.flat[0].platform != "cpu":
    return f"the devices are {mesh.devices.flat[0].platform}, not XLA:CPU"
  if jax.process_count() > 1:
    return f"{jax.process_count()} processes (it sums within one process)"
  if mesh.shape["fsdp"] > 1 or mesh.shape["model"] > 1:
    return f"mesh {dict(mesh.shape)} shards parameters (it needs them replicated: fsdp = model = 1)"
  if n_data < 2 or n_data & (n_data - 1):
    return f"mesh.data = {n_data} is not a power of two >= 2"
  return None


def choose(setting: str, mesh: Mesh) -> bool:
  """Whether the train step may sum gradients pairwise (`mesh.grad_sum`): collective never; pairwise always, or an
  error naming why it cannot run here; auto where it can run (per_device_sums then still checks the loss)."""
  if setting not in CHOICES:
    raise ValueError(f"mesh.grad_sum={setting!r}: expected one of {', '.join(CHOICES)}")
  if setting == "collective":
    return False
  why_not = unsupported(mesh)
  if why_not and setting == "pairwise":
    raise ValueError(f"mesh.grad_sum=pairwise cannot run here: {why_not}; use auto or collective")
  return why_not is None


def draws_random(fn: Callable, *args) -> bool:
  """Whether fn(*args)'s outputs depend on its last argument, a random key (dropout, HRM's halting exploration):
  traced, dead code removed (a key folded with the step or microbatch index and then unused does not count)."""
  closed = jax.make_jaxpr(fn)(*args)
  n_key_leaves = len(jax.tree.leaves(args[-1]))
  try:
    from jax._src.interpreters import partial_eval  # dce_jaxpr: no public equivalent
    _, used = partial_eval.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
  except (ImportError, AttributeError, TypeError):  # the private API moved: assume the key is read
    return True
  return any(used[-n_key_leaves:])


def per_device_sums(fn: Callable, *, collective: Callable, mesh: Mesh, same_randomness: bool = True) -> Callable:
  """fn(params, batch, rng) -> a tree of sums over the batch's rows, as a function that runs fn on each device's
  rows (a shard_map over mesh 'data', parameters replicated) and adds the devices' trees with tree_sum.

  Each device folds its index into `rng`, so dropout masks differ between devices' rows but also from those of
  the same batch on one device. `collective` (the same sums over the global batch, XLA's all-reduce) is taken
  instead when fn draws random numbers and `same_randomness` (mesh.grad_sum=auto) asks that a run's random draws
  not depend on the device count."""
  n_devices = mesh.shape["data"]
  rows = P(("data", "fsdp"))

  def on_each_device(params, batch, rng):
    rng = jax.random.fold_in(rng, jax.lax.axis_index("data"))
    with sharding.no_activation_sharding():  # inside the shard_map the arrays are the device's own
      sums = fn(params, batch, rng)
    return tree_sum(sums, "data", n_devices)

  # check_vma=False: the butterfly leaves every device the same bits, which the type system cannot see.
  pairwise = jax.shard_map(on_each_device, mesh=mesh, in_specs=(P(), rows, P()), out_specs=P(), check_vma=False)

  def sums(params, batch, rng):
    if same_randomness:
      with sharding.no_activation_sharding():
        random = draws_random(fn, params, batch, rng)
      if random:
        log.info("gradients: XLA's all-reduce over %d devices (the loss draws random numbers)", n_devices)
        return collective(params, batch, rng)
    log.info("gradients: summed pairwise over %d CPU devices (mesh.grad_sum)", n_devices)
    return pairwise(params, batch, rng)

  return sums
