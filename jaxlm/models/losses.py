"""Loss pieces shared by the architectures' `loss` methods.

A `loss(batch, deterministic)` method returns (objective sum, weight sum, {name: sum}); the trainer divides
every sum by the weight sum, so gradient accumulation and data parallelism average exactly. `xent` (token
cross-entropy) must be among the sums: evaluation and perplexity use it.
"""
import jax
import jax.numpy as jnp
import optax


def weighted_xent(logits_BxTxV: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array):
  """(sum of weighted token cross-entropies, sum of weights), in float32."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32), targets_BxT)
  weights = weights_BxT.astype(jnp.float32)
  return jnp.sum(losses * weights), jnp.sum(weights)


XENT_CHUNK_BUDGET = 2 ** 25   # auto: logits elements per chunk (128 MB in float32)
MIN_AUTO_CHUNK = 64


def auto_xent_chunk(batch: int, length: int, vocab: int) -> int:
  """Tokens per chunk: a power of two keeping batch x chunk x vocab near the budget (the whole length when it
  fits, so small models compute their loss in one piece as before)."""
  if batch * length * vocab <= XENT_CHUNK_BUDGET:
    return length
  chunk = max(MIN_AUTO_CHUNK, 1 << max(0, (XENT_CHUNK_BUDGET // (batch * vocab)).bit_length() - 1))
  return min(chunk, length)


def chunked_xent(hidden_BxTxD: jax.Array, project, targets_BxT: jax.Array, weights_BxT: jax.Array,
                 chunk: int = 0):
  """weighted_xent(project(hidden), targets, weights) without a whole [B, T, V] logits tensor.

  The sequence is cut into chunks of `chunk` tokens (0 = auto_xent_chunk); a scan computes each chunk's logits
  and loss, and rematerialises them in the backward pass, so at most one chunk's logits (and their gradient)
  exist at a time. `project` maps hidden [B, C, D] to float32 logits [B, C, V].
  """
  b, t, _ = hidden_BxTxD.shape
  if chunk == 0:
    chunk = auto_xent_chunk(b, t, jax.eval_shape(project, hidden_BxTxD[:, :1]).shape[-1])
  if chunk >= t:
    return weighted_xent(project(hidden_BxTxD), targets_BxT, weights_BxT)
  n = -(-t // chunk)
  pad = n * chunk - t

  def tiles(x):  # [B, T, ...] -> [n, B, C, ...], padded tokens weigh 0
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
    return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)

  def body(totals, xs):
    hidden, targets, weights = xs
    return totals + jnp.stack(weighted_xent(project(hidden), targets, weights)), None

  totals, _ = jax.lax.scan(jax.checkpoint(body), jnp.zeros(2, jnp.float32),
                           (tiles(hidden_BxTxD), tiles(targets_BxT), tiles(weights_BxT)))
  return totals[0], totals[1]
