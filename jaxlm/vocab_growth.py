"""Vocabulary growth that keeps the function: new token ids appended after the old ones.

Old ids keep their meaning and their embedding and output rows. The new rows are chosen so that, on the probe
text (the parent's validation text), the old tokens' logits are unchanged (bit for bit with an untied head; see grow_checked) and the new tokens' total
probability is at most TARGET_PROBABILITY at every measured position:
- an untied head with a bias (HROM, YingGem): zero kernel columns and a bias below every measured position's
  log-sum-exp of the old logits by log(#new / target): the new logits are constants the softmax can ignore;
- a head without a bias (Optimus Prime, HRM) or tied to the embedding (HRM-Text1): the new logit is h . w_new,
  so w_new = -alpha * m / |m|^2 with m the mean of the measured final hidden states h: h . w_new = -alpha s(h),
  s(h) = h . m / |m|^2 > 0 for hidden states that share a direction (refused, naming it, when one does not), and
  alpha the smallest value that keeps every measured position below the same bound.
New input embeddings (untied) are the mean of the old rows; tied models use w_new for both (those tokens have
never been inputs). The hidden states are read through the model's own forward pass, with D probe output
columns set to the identity (so its extra logits are h), which needs no per-family code.

Everything here works on the canonical layout (per-block, unpadded vocabulary): jaxlm.init_from pads afterwards.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Dict, Mapping, NamedTuple, Tuple

import numpy as np
from flax import traverse_util

TARGET_PROBABILITY = 1e-5   # aimed at on the measured positions: 10x below the 1e-4 promised on unmeasured ones
PROMISED_PROBABILITY = 1e-4
OLD_LOGIT_TOLERANCE = 1e-6  # relative, for tied heads (see grow_checked); untied ones measure 0


class Roles(NamedTuple):
  """The vocabulary-axis parameters by role ('path/to/param' keys; None where the model has none)."""
  embedding: str
  kernel: Any          # untied output kernel
  bias: Any            # output bias
  axes: Dict[str, int]


class Growth(NamedTuple):
  model_dict: Dict[str, Any]
  params: Dict[str, Any]
  figures: Dict[str, Any]   # how the new rows were set and what was measured (for the history event)


def vocab_roles(model_dict: Mapping[str, Any]) -> Roles:
  from jaxlm.init_from import canonical_model
  from jaxlm.models import layout
  axes = layout.vocab_axes(canonical_model(model_dict))
  embedding = [k for k in axes if k.endswith("embedding")]
  biases = [k for k in axes if k.endswith("bias")]
  kernels = [k for k in axes if k not in embedding and k not in biases]
  if len(embedding) != 1 or len(kernels) > 1 or len(biases) > 1:
    raise ValueError(f"vocabulary growth knows models with one embedding, at most one output kernel and bias; "
                     f"this one's vocabulary parameters are {sorted(axes)}")
  return Roles(embedding[0], kernels[0] if kernels else None, biases[0] if biases else None, axes)


def _append(value: np.ndarray, axis: int, rows: np.ndarray) -> np.ndarray:
  """`value` with `rows` (vocabulary along axis 0) appended along its vocabulary `axis`."""
  return np.concatenate([np.asarray(value), np.moveaxis(np.asarray(rows, np.asarray(value).dtype), 0, axis)], axis)


def _with_rows(model_dict, params, roles: Roles, rows: Mapping[str, np.ndarray]) -> Tuple[Dict, Dict]:
  """(model dict, params) with `rows[key]` ([n, ...], vocabulary first) appended to each vocabulary parameter."""
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  n = {len(r) for r in rows.values()}.pop()
  for key, axis in roles.axes.items():
    flat[key] = _append(flat[key], axis, rows[key])
  return {**model_dict, "vocab_size": int(model_dict["vocab_size"]) + n}, traverse_util.unflatten_dict(flat, sep="/")


@functools.lru_cache(maxsize=16)
def _compiled_forward(model_json: str):
  import jax
  from jaxlm.models import build_model
  _, module = build_model(json.loads(model_json))
  return jax.jit(lambda p, t: module.apply({"params": p}, t))


def forward(model_dict, params, ids) -> np.ndarray:
  """float32 logits [B, T, V] of a canonical model (one compiled function per model config, reused)."""
  from jaxlm.init_from import canonical_model
  fn = _compiled_forward(json.dumps(canonical_model(model_dict), sort_keys=True))
  return np.asarray(fn(params, np.asarray(ids, np.int32)))


def hidden_states(model_dict, params, ids) -> Tuple[np.ndarray, np.ndarray]:
  """(old logits [N, V], hidden states [N, D]) at every position of `ids` [B, T], through the model's forward
  with D identity output columns appended (their logits are the hidden states the head sees)."""
  roles = vocab_roles(model_dict)
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  d = int(np.shape(flat[roles.embedding])[1])
  identity = np.eye(d, dtype=np.float32)
  rows = {roles.embedding: identity if roles.kernel is None else np.zeros((d, d), np.float32)}
  if roles.kernel is not None:
    rows[roles.kernel] = identity
  if roles.bias is not None:
    rows[roles.bias] = np.zeros((d,), np.float32)
  probe_dict, probe = _with_rows(model_dict, params, roles, rows)
  v = int(model_dict["vocab_size"])
  logits = forward(probe_dict, probe, ids).reshape(-1, v + d)
  return logits[:, :v].astype(np.float64), logits[:, v:].astype(np.float64)


def _logsumexp(x: np.ndarray) -> np.ndarray:
  top = np.max(x, axis=-1, keepdims=True)
  return (top + np.log(np.sum(np.exp(x - top), axis=-1, keepdims=True)))[..., 0]


def shared_direction(hidden: np.ndarray) -> Tuple[np.ndarray, str]:
  """A direction u with h . u > 0 for every row h of `hidden` [N, D], and how it was found: the mean of the rows
  (scaled so a mean-like h has h . u = 1) when it works (it does on trained models' hidden states, and it carries
  over to text not measured), else the direction that maximises the smallest h . u (a linear program)."""
  mean = hidden.mean(axis=0)
  if np.all(hidden @ mean > 0):
    return mean / (mean @ mean), "mean hidden state"
  from scipy.optimize import linprog
  n, d = hidden.shape
  # variables (u, t): maximise t subject to h_i . u >= t, -1 <= u <= 1
  result = linprog(np.r_[np.zeros(d), -1.0], A_ub=np.c_[-hidden, np.ones(n)], b_ub=np.zeros(n),
                   bounds=[(-1, 1)] * d + [(None, 1)], method="highs")
  if not result.success or result.x[-1] <= 1e-9:
    raise ValueError(f"vocabulary growth: no output row is negative on all {n} measured hidden states (they "
                     "surround the origin); probe on other text or train the parent longer")
  return result.x[:d], "max-margin direction of the hidden states"


def grow_params(model_dict: Mapping[str, Any], params: Mapping[str, Any], n_new: int, probe_ids) -> Growth:
  """Canonical (model dict, params) with `n_new` ids appended (see the module docstring); `probe_ids` [B, T]
  old ids of the text the bound is measured on."""
  if n_new <= 0:
    raise ValueError(f"vocabulary growth needs a positive number of new ids, got {n_new}")
  probe_ids = np.asarray(probe_ids)
  v = int(model_dict["vocab_size"])
  if probe_ids.size == 0 or probe_ids.max() >= v or probe_ids.min() < 0:
    raise ValueError(f"vocabulary growth needs probe text of old ids in [0, {v}); got {probe_ids.size} ids")
  roles = vocab_roles(model_dict)
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  old_logits, hidden = hidden_states(model_dict, params, probe_ids)
  # The new logits must sit log(n_new / target) below the old tokens' log-sum-exp at every measured position.
  bound = _logsumexp(old_logits) - np.log(n_new / TARGET_PROBABILITY)
  embedding = np.asarray(flat[roles.embedding])
  figures: Dict[str, Any] = {"probe_positions": int(len(hidden))}
  rows: Dict[str, np.ndarray] = {}
  if roles.kernel is not None and roles.bias is not None:
    rows[roles.kernel] = np.zeros((n_new, embedding.shape[1]), np.float32)
    rows[roles.bias] = np.full((n_new,), np.min(bound), np.float32)
    rows[roles.embedding] = np.repeat(embedding.mean(axis=0, keepdims=True), n_new, axis=0)
    figures.update(rule="zero kernel columns, bias", new_bias=float(np.min(bound)))
  else:
    unit, how = shared_direction(hidden)
    along = hidden @ unit  # the new logit is -alpha * along
    alpha = max(0.0, float(np.max(-bound / along)))
    direction = (-alpha * unit).astype(np.float32)
    new_rows = np.repeat(direction[None], n_new, axis=0)
    if roles.kernel is not None:
      rows[roles.kernel] = new_rows
      rows[roles.embedding] = np.repeat(embedding.mean(axis=0, keepdims=True), n_new, axis=0)
    else:
      rows[roles.embedding] = new_rows  # tied: the output row is also the (never yet seen) token's input
    if roles.bias is not None:
      rows[roles.bias] = np.zeros((n_new,), np.float32)
    figures.update(rule=f"rows along minus the {how}", alpha=alpha, row_norm=float(np.linalg.norm(direction)),
                   min_alignment=float(np.min(along)))
  grown_dict, grown = _with_rows(model_dict, params, roles, rows)
  return Growth(grown_dict, grown, figures)


def measure(old_dict, old_params, grown_dict, grown_params, probe_ids) -> Dict[str, float]:
  """Old-logit max |difference| and the new tokens' total probability (max and mean over positions) on
  `probe_ids`, measured with the models' forward passes."""
  v = int(old_dict["vocab_size"])
  before = forward(old_dict, old_params, probe_ids)
  after = forward(grown_dict, grown_params, probe_ids)
  probability = np.exp(after - _logsumexp(after.astype(np.float64))[..., None])[..., v:].sum(axis=-1)
  return {"old_logit_max_abs_diff": float(np.max(np.abs(after[..., :v] - before))),
          "old_logit_max_abs": float(np.max(np.abs(before))),
          "old_logits_bit_equal": bool(np.array_equal(after[..., :v], before)),
          "new_probability_max": float(np.max(probability)), "new_probability_mean": float(np.mean(probability))}


def grow_checked(model_dict, params, n_new: int, probe_ids) -> Growth:
  """grow_params, then measured: refused, with the figures, unless the old logits are kept and the new
  tokens' total probability is at most PROMISED_PROBABILITY at every probe position."""
  growth = grow_params(model_dict, params, n_new, probe_ids)
  figures = {**growth.figures, **measure(model_dict, params, growth.model_dict, growth.params, probe_ids)}
  # Untied heads keep the old logits bit for bit; a tied head's matmul over a longer table may be tiled otherwise
  # by XLA (measured on CPU: up to 5e-7 of logits ~1 at some widths), so it is held to float32 rounding.
  close = figures["old_logit_max_abs_diff"] <= OLD_LOGIT_TOLERANCE * max(1.0, figures.pop("old_logit_max_abs"))
  if not close or figures["new_probability_max"] > PROMISED_PROBABILITY:
    raise ValueError(f"vocabulary growth did not keep the function on the probe text: {figures}")
  return growth._replace(figures=figures)
