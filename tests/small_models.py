"""Trained-like parameters of a model's shapes without compiling its init (tests where compilation dominates)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen

from jaxlm.models import build_model


def random_params(model, seed=0):
  """Values around what training leaves: 1-D arrays (norm scales, biases) 1 + 0.3 N(0, 1), so no scale is 1 and
  no bias 0; matrices 0.2 N(0, 1). Shapes from jax.eval_shape of the model's init (traced, never compiled)."""
  _, module = build_model(model)
  shapes = linen.meta.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: ((1.0 if len(s.shape) == 1 else 0.0) + (0.3 if len(s.shape) == 1 else 0.2)
                                 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
