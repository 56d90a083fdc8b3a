"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p, greedy or sampled.

Order of operations, per row, on float32 logits of the last position:
  1. repetition penalty, from the counts of every token seen so far (prompt included):
       'divide' (YingGem's formula): logit / penalty**count, whatever the logit's sign;
       'sign'   (CTRL / Hugging Face): for each token seen at least once, logit / penalty if the logit is > 0,
                else logit * penalty.
  2. greedy (temperature 0): argmax of the penalised logits; steps 3-5 are skipped.
  3. temperature: logits / temperature (both penalties are multiplicative, so 1 and 3 commute).
  4. top-k (k > 0): keep logits >= the k-th largest (ties with it are kept, as in YingGem).
  5. top-p (p < 1): over the logits left by top-k, sorted descending, keep a token while the probability mass
     of the tokens before it is <= p (so the most likely token always stays and p = 0 keeps only it; this is
     YingGem's and Optimus Prime's rule); tokens tied with the last kept one are kept too.
  6. sample from softmax of what is left, with key fold_in(fold_in(key(seed), step), row): the same prompt
     and seed give the same tokens whatever else is in the batch and whichever decoding path runs.

Which stages run is static (a `Sampling` hashes them into the jit cache key); their values are traced, so
changing the temperature or top-p between calls does not recompile.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

PENALTY_STYLES = ("divide", "sign")


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Sampling settings. temperature 0 = greedy; top_k 0 and top_p 1 are off; repetition_penalty 1 is off."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  penalty_style: str = "sign"

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 <= self.top_p <= 1.0:
      raise ValueError(f"top_p must be in [0, 1] (1 = off), got {self.top_p}")
    if not self.repetition_penalty > 0:
      raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
    if self.penalty_style not in PENALTY_STYLES:
      raise ValueError(f"penalty_style must be one of {PENALTY_STYLES}, got {self.penalty_style!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  @property
  def uses_penalty(self) -> bool:
    return self.repetition_penalty != 1.0

  def stages(self) -> "Stages":
    """The static part: which stages run."""
    return Stages(greedy=self.greedy, penalty=self.penalty_style if self.uses_penalty else "",
                  top_k=not self.greedy and self.top_k > 0, top_p=not self.greedy and self.top_p < 1.0)

  def values(self) -> dict:
    """The traced part."""
    return {"temperature": jnp.float32(self.temperature or 1.0), "top_k": jnp.int32(self.top_k),
            "top_p": jnp.float32(self.top_p), "penalty": jnp.float32(self.repetition_penalty)}


@dataclasses.dataclass(frozen=True)
class Stages:
  greedy: bool = True
  penalty: str = ""      # '' | 'divide' | 'sign'
  top_k: bool = False
  top_p: bool = False


def token_counts(sequences: Sequence[Sequence[int]], vocab_size: int) -> np.ndarray:
  """int32 [B, V]: how often each token occurs in each row (for the repetition penalty)."""
  counts = np.zeros((len(sequences), vocab_size), np.int32)
  for row, seq in enumerate(sequences):
    np.add.at(counts[row], np.asarray(seq, np.int64), 1)
  return counts


def penalize(logits_BxV: Array, counts_BxV: Array, penalty: Array, style: str) -> Array:
  if style == "divide":
    return logits_BxV / jnp.power(penalty, counts_BxV.astype(jnp.float32))
  if style == "sign":
    scaled = jnp.where(logits_BxV > 0, logits_BxV / penalty, logits_BxV * penalty)
    return jnp.where(counts_BxV > 0, scaled, logits_BxV)
  raise ValueError(f"penalty style must be one of {PENALTY_STYLES}, got {style!r}")


def filter_top(logits_BxV: Array, top_k: Array, top_p: Array, stages: Stages) -> Array:
  """Sets logits outside the top-k / top-p set to -inf (one descending sort serves both)."""
  sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
  v = logits_BxV.shape[-1]
  threshold_B = jnp.full(logits_BxV.shape[:1], -jnp.inf, logits_BxV.dtype)
  if stages.top_k:
    kth_B = jnp.take(sorted_BxV, jnp.clip(top_k, 1, v) - 1, axis=-1)
    threshold_B = jnp.where(top_k > 0, kth_B, threshold_B)
    sorted_BxV = jnp.where(sorted_BxV >= threshold_B[:, None], sorted_BxV, -jnp.inf)
  if stages.top_p:
    probs = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep_B = jnp.maximum(jnp.sum(mass_before <= top_p, axis=-1), 1)
    last_kept_B = jnp.take_along_axis(sorted_BxV, (n_keep_B - 1)[:, None], axis=-1)[:, 0]
    threshold_B = jnp.maximum(threshold_B, last_kept_B)
  return jnp.where(logits_BxV >= threshold_B[:, None], logits_BxV, -jnp.inf)


def choose(logits_BxV: Array, counts_BxV: Optional[Array], values: dict, stages: Stages, key: Array,
           step: Array) -> Array:
  """Next token ids [B] (int32) from float logits [B, V], following the order in the module docstring."""
  logits = logits_BxV.astype(jnp.float32)
  if stages.penalty:
    logits = penalize(logits, counts_BxV, values["penalty"], stages.penalty)
  if stages.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / values["temperature"]
  if stages.top_k or stages.top_p:
    logits = filter_top(logits, values["top_k"], values["top_p"], stages)
  step_key = jax.random.fold_in(key, step)
  rows = jnp.arange(logits.shape[0])
  keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(rows)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
