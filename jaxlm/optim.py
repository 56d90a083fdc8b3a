"""Optax optimizers and learning-rate schedules built from the `opt` config section."""
from __future__ import annotations

from typing import Callable

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


def make_optimizer(opt_cfg, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """Returns (optimizer, schedule). Gradient clipping by global norm comes first when opt.clip_norm > 0."""
  schedule = make_schedule(opt_cfg, total_steps)
  mask = _decay_mask(opt_cfg.get("weight_decay_on", "matrices"))
  name = opt_cfg.name
  if name == "adamw":
    core = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                       weight_decay=opt_cfg.weight_decay, mask=mask)
  elif name == "adafactor":
    core = optax.adafactor(schedule, multiply_by_parameter_scale=opt_cfg.get("scale_by_param_rms", True),
                           decay_rate=opt_cfg.get("decay_rate", 0.8), clipping_threshold=1.0,
                           weight_decay_rate=opt_cfg.weight_decay or None, weight_decay_mask=mask)
  else:
    raise ValueError(f"opt.name must be 'adamw' or 'adafactor', got {name!r}")
  chain = [optax.clip_by_global_norm(opt_cfg.clip_norm)] if opt_cfg.clip_norm > 0 else []
  return optax.chain(*chain, core), schedule
