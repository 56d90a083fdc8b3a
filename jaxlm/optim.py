"""Optax optimizers and learning-rate schedules built from the `opt` config section."""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import optax


def _warmup_then(warmup: int, peak: float, after: Callable) -> Callable:
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup, 1)
    return jnp.where(step < warmup, warm, after(step - warmup))
  return schedule


def make_schedule(opt_cfg, total_steps: int) -> Callable:
  """lr(step) for schedule in {cosine, linear, constant, rsqrt_relative}; linear warmup first."""
  peak, warmup = float(opt_cfg.lr), int(opt_cfg.warmup_steps)
  end = peak * float(opt_cfg.get("min_lr_ratio", 0.0))
  decay = max(total_steps - warmup, 1)
  kind = opt_cfg.schedule
  if kind == "cosine":
    after = lambda s: end + 0.5 * (peak - end) * (1 + jnp.cos(jnp.pi * jnp.minimum(s / decay, 1.0)))
  elif kind == "linear":
    after = lambda s: peak + (end - peak) * jnp.minimum(s / decay, 1.0)
  elif kind == "constant":
    after = lambda s: jnp.full_like(s, peak)
  elif kind == "rsqrt_relative":
    # Adafactor's relative step with warmup_init (original YingGem): min(1e-6 * t, 1 / sqrt(t)), t from 1.
    return lambda step: jnp.minimum(1e-6 * (step + 1.0), jax.lax.rsqrt(step + 1.0))
  else:
    raise ValueError(f"opt.schedule must be cosine, linear, constant or rsqrt_relative, got {kind!r}")
  return _warmup_then(warmup, peak, after)


def _decay_mask(kind: str):
  """Which parameters get weight decay: 'all', or 'matrices' (rank >= 2: kernels and embeddings)."""
  if kind == "all":
    return None
  if kind == "matrices":
    return lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  raise ValueError(f"opt.weight_decay_on must be 'all' or 'matrices', got {kind!r}")


def _muon_dimensions(names: Optional[Sequence[Optional[str]]], ndim: int, is_kernel: bool):
  """How Muon sees one parameter, from its logical axis names: a matrix from the axes on the input side
  (reduction) to those on the output side; 'layers' (scanned blocks) and unnamed axes (a gated MLP's pair) are
  batch axes. Embeddings, the output head (a 'vocab' axis), biases and norm scales are left to AdamW (None)."""
  names = list(names) if names else [None] * ndim
  if not is_kernel or "vocab" in names:
    return None
  named = [i for i, n in enumerate(names) if n not in (None, "layers")]
  if len(named) < 2:
    return None
  from optax.contrib import MuonDimensionNumbers
  if names[named[0]] == "embed":  # projections out of the residual stream: query/key/value, the MLP's input
    return MuonDimensionNumbers(reduction_axis=(named[0],), output_axis=tuple(named[1:]))
  return MuonDimensionNumbers(reduction_axis=tuple(named[:-1]), output_axis=(named[-1],))


def _is_box(x) -> bool:
  import flax.linen as nn
  return isinstance(x, nn.Partitioned)


def _key(path) -> tuple:
  return tuple(getattr(p, "key", getattr(p, "name", None)) for p in path)


def param_axis_names(boxed_params) -> Dict[tuple, Any]:
  """{key path: logical axis names} of a boxed parameter tree (the model's init under jax.eval_shape): what
  make_optimizer's `param_names` expects."""
  flat, _ = jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=_is_box)
  return {_key(path): getattr(x, "names", None) for path, x in flat}


def _muon_dimension_fn(param_names: Mapping[tuple, Any]) -> Callable:
  """The tree of Muon dimension numbers for a parameter tree, boxed (optimizer.init inside the model's init)
  or not (the update): box metadata where there is a box, else `param_names` ({key path: axis names})."""
  def leaf(path, x):
    path_keys = _key(path)
    if isinstance(x, optax.MaskedNode):  # a leaf a mask left out: not Muon's
      return None
    if _is_box(x):
      return _muon_dimensions(x.names, x.value.ndim, path_keys[-1] == "kernel")
    return _muon_dimensions(param_names.get(path_keys), jnp.ndim(x), path_keys[-1] == "kernel")

  return lambda tree: jax.tree_util.tree_map_with_path(leaf, tree, is_leaf=_is_box)


def make_optimizer(opt_cfg, total_steps: int, param_names: Optional[Mapping[tuple, Any]] = None
                   ) -> tuple[optax.GradientTransformation, Callable]:
  """Returns (optimizer, schedule). Gradient clipping by global norm comes first when opt.clip_norm > 0.
  `param_names` ({key path: logical axis names}) tells opt.name='muon' which parameters are matrices."""
  schedule = make_schedule(opt_cfg, total_steps)
  mask = _decay_mask(opt_cfg.get("weight_decay_on", "matrices"))
  name = opt_cfg.name
  if name == "adamw":
    core = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                       weight_decay=opt_cfg.weight_decay, mask=mask)
  elif name == "muon":
    # Muon (momentum orthogonalised by Newton-Schulz) on the block matrices, AdamW at opt.adam_lr on the rest;
    # one schedule shape for both (modded-nanogpt's split).
    if param_names is None:
      raise ValueError("opt.name='muon' needs the model's parameter names (make_optimizer(param_names=...))")
    adam_ratio = float(opt_cfg.get("adam_lr", 0.0) or 0.0) / float(opt_cfg.lr) if opt_cfg.get("adam_lr") else 1.0
    from optax.contrib import muon
    core = muon(schedule, beta=float(opt_cfg.get("muon_momentum", 0.95)), weight_decay=opt_cfg.weight_decay,
                weight_decay_mask=mask, adam_b1=opt_cfg.b1, adam_b2=opt_cfg.b2,
                adam_learning_rate=lambda step: schedule(step) * adam_ratio,
                muon_weight_dimension_numbers=_muon_dimension_fn(param_names))
  elif name == "adafactor":
    core = optax.adafactor(schedule, multiply_by_parameter_scale=opt_cfg.get("scale_by_param_rms", True),
                           decay_rate=opt_cfg.get("decay_rate", 0.8), clipping_threshold=1.0,
                           weight_decay_rate=opt_cfg.weight_decay or None, weight_decay_mask=mask)
  else:
    raise ValueError(f"opt.name must be 'adamw', 'adafactor' or 'muon', got {name!r}")
  chain = [optax.clip_by_global_norm(opt_cfg.clip_norm)] if opt_cfg.clip_norm > 0 else []
  return optax.chain(*chain, core), schedule
