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
