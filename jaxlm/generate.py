"""Text generation by full recompute over a fixed-size context window.

Each step runs one jitted forward over the last `context` tokens (a static shape, so it compiles once) and
samples from the logits of the last real token. Padding after the real tokens is masked as keys, which keeps
the result exact for non-causal original models too.
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("module",))
def _last_logits(module, params, window_1xC, length):
  c = window_1xC.shape[1]
  valid_1xC = (jnp.arange(c) < length)[None, :]
  logits = module.apply({"params": params}, window_1xC, padding_mask_BxT=valid_1xC)
  return logits[0, length - 1]


def sample_ids(module, params, prompt_ids: List[int], max_new_tokens: int, *, context: int,
               temperature: float = 1.0, top_k: int = 0, seed: int = 0,
               on_token: Optional[Callable[[int], None]] = None) -> List[int]:
  """Autoregressive sampling; temperature 0 is greedy. Returns only the new token ids."""
  if not prompt_ids:
    raise ValueError("the prompt is empty: give at least one token")
  ids = list(prompt_ids)
  rng = jax.random.key(seed)
  new: List[int] = []
  for i in range(max_new_tokens):
    window = ids[-context:]
    padded = np.zeros((1, context), np.int32)
    padded[0, :len(window)] = window
    logits = _last_logits(module, params, jnp.asarray(padded), jnp.int32(len(window)))
    if temperature == 0:
      token = int(jnp.argmax(logits))
    else:
      logits = logits / temperature
      if top_k:
        kth = jnp.sort(logits)[-top_k]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
      token = int(jax.random.categorical(jax.random.fold_in(rng, i), logits))
    ids.append(token)
    new.append(token)
    if on_token is not None:
      on_token(token)
  return new
