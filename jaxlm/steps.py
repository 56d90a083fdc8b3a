"""The pure, jitted pieces of training: the train state, one optimizer step and one evaluation batch."""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


# ------------------------------------------------------------------------------------------ pure steps
def _loss_sums(params, batch, rng, module, deterministic=False):
  """Every architecture's `loss` method returns (objective sum, weight sum, {metric name: sum})."""
  return module.apply({"params": params}, batch, deterministic=deterministic, rngs={"dropout": rng},
                      method="loss")


def split_microbatches(x: jax.Array, grad_accum: int, sharding=None) -> jax.Array:
  """[B, ...] -> [A, B/A, ...] where microbatch a holds rows a, a + A, a + 2A, ...

  The batch is sharded in contiguous blocks of rows, so this strided split gives every device an equal share of
  every microbatch (B / A / devices rows each): no device waits while others work, and no rows move between
  devices. `sharding` (for the [A, B/A, ...] array) pins that layout for the compiler.
  """
  x = jnp.swapaxes(x.reshape((-1, grad_accum) + x.shape[1:]), 0, 1)
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def batch_sums_and_grads(params, batch: Dict[str, jax.Array], rng: jax.Array, *, module, grad_accum: int,
                         microbatch_sharding=None):
  """((sum of token losses, (sum of weights, {metric: sum})), d(sum of token losses)/d(params)) over the batch,
  split into `grad_accum` microbatches scanned in sequence. `microbatch_sharding`: see split_microbatches."""

  def objective(params, mb, mb_rng):
    total, weight, sums = _loss_sums(params, mb, mb_rng, module)
    return total, (weight, sums)

  grad_fn = jax.value_and_grad(objective, has_aux=True)
  if grad_accum == 1:
    return grad_fn(params, batch, rng)
  micro_batches = jax.tree.map(lambda x: split_microbatches(x, grad_accum, microbatch_sharding), batch)

  def micro_step(acc, xs):
    mb, i = xs
    out, grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, acc, (out, grads)), None

  first = jax.tree.map(lambda x: x[0], micro_batches)
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first, rng))
  return jax.lax.scan(micro_step, zeros, (micro_batches, jnp.arange(grad_accum)))[0]


def train_step(state: TrainState, batch: Dict[str, jax.Array], base_rng: jax.Array, *, module, optimizer,
               grad_accum: int, microbatch_sharding=None,
               per_device: Optional[Callable] = None) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimizer step on a global batch, split into `grad_accum` microbatches scanned in sequence.

  The gradient is d(sum of token losses)/d(params) / (number of weighted tokens), exactly the gradient of the
  mean loss over the whole batch, whatever the split. `microbatch_sharding`: see split_microbatches.
  `per_device`: pairwise_sum.per_device_sums bound to a mesh (and to whether it may fall back to `collective`): sum
  each device's rows, then add the devices' sums pairwise instead of by XLA's all-reduce; None: one program over
  the global batch.
  """
  rng = jax.random.fold_in(base_rng, state.step)
  sums_and_grads = functools.partial(batch_sums_and_grads, module=module, grad_accum=grad_accum,
                                     microbatch_sharding=microbatch_sharding)
  if per_device is not None:  # inside the shard_map each device splits its own rows
    sums_and_grads = per_device(functools.partial(batch_sums_and_grads, module=module, grad_accum=grad_accum),
                                collective=sums_and_grads)
  (total, (weight, sums)), grads = sums_and_grads(state.params, batch, rng)
  weight = jnp.maximum(weight, 1.0)
  grads = jax.tree.map(lambda g: g / weight, grads)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # A non-finite loss or gradient never reaches the state: the update is dropped here, on the device, and the
  # host learns of it from metrics["nonfinite"] when it next reads the metrics (train.on_nonfinite decides).
  finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
  keep_if_bad = lambda new, old: jnp.where(finite, new, old)
  params = jax.tree.map(keep_if_bad, params, state.params)
  opt_state = jax.tree.map(keep_if_bad, opt_state, state.opt_state)
  metrics = {"loss": total / weight, "grad_norm": grad_norm, "nonfinite": 1 - finite.astype(jnp.int32),
             **{k: v / weight for k, v in sums.items()}}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def train_step_on_chunk(state: TrainState, placed, base_rng: jax.Array, *, step: Callable, batch_sharding):
  """`step` (train_step, bound) on batch `index` of `placed` = (chunk of K batches [K, B, ...], index), the batch
  kept sharded as `batch_sharding`: the loop places K batches on the devices at once (train.batches_per_put) and
  each step takes its own there."""
  chunk, index = placed
  batch = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, keepdims=False), chunk)
  return step(state, jax.lax.with_sharding_constraint(batch, batch_sharding), base_rng)


def eval_step(params, batch, totals, *, module) -> jax.Array:
  """`totals` + [sum of token cross-entropies, sum of weights] of one batch: an evaluation sums on the
  devices and reads the result once."""
  _, weight, sums = _loss_sums(params, batch, jax.random.key(0), module, deterministic=True)
  return totals + jnp.stack([sums["xent"], weight])
