"""Traces of an HRM's reasoning states and halting, and of HRM-Text1's pondering.

HRM: for one prompt and a reasoning mode (N cycles x T steps), the segments ACT runs (as many as the model's own
`act` takes for its slowest position) are replayed step by step with the model's own l_step/h_step: the norm of
z_L after every L update and of z_H after every H update (Frobenius norm over all positions and features, as the
original's architecture_demo.py prints them), the Q-head's halt margin q_halt - q_continue after each segment
(ACT halts where it is > 0) and the ACT steps (segments) per position from `act` itself.
HRM-Text1: the halt heads' probabilities per layer and pondering step for each position, and the expected number
of block-pair updates per position. (Its per-step states are inside scans and are not traced.)
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.models import hrm as hrm_model


def hrm_trace(config, module, params, tokens: List[int], n_cycles: int, t_steps: int) -> Dict[str, Any]:
  """{'l_norms': [segments*N*T], 'h_norms': [segments*N], 'halt_margin': [segments, positions or 1],
  'steps': [positions or 1], 'segments': int} for one prompt in mode (n_cycles, t_steps)."""
  ids = jnp.asarray([tokens], jnp.int32)
  act = jax.jit(functools.partial(module.apply, n_cycles=n_cycles, t_steps=t_steps, method=module.act))(
      {"params": params}, ids)
  steps = np.asarray(act["steps"]).reshape(-1)
  segments = int(steps.max())

  def replay(mdl, tokens_BxT):
    ctx = mdl.context(tokens_BxT)
    z_L, z_H = mdl.initial_state(*tokens_BxT.shape)
    l_norms, h_norms, margins = [], [], []
    for _ in range(segments):
      for _ in range(n_cycles):
        for _ in range(t_steps):
          z_L = mdl.l_step(z_L, z_H, ctx)
          l_norms.append(jnp.linalg.norm(z_L))
        z_H = mdl.h_step(z_H, z_L, ctx)
        h_norms.append(jnp.linalg.norm(z_H))
      q = mdl.q_logits(z_H, ctx.valid_BxT)
      margins.append((q[..., 0] - q[..., 1]).reshape(-1))
    return jnp.stack(l_norms), jnp.stack(h_norms), jnp.stack(margins)

  # One compiled program: unjitted, the unrolled steps dispatch op by op.
  l_norms, h_norms, margins = jax.jit(functools.partial(module.apply, method=replay))({"params": params}, ids)
  return {"n_cycles": n_cycles, "t_steps": t_steps, "segments": segments, "steps": steps.tolist(),
          "l_norms": np.asarray(l_norms).tolist(), "h_norms": np.asarray(h_norms).tolist(),
          "halt_margin": np.asarray(margins).tolist()}


def hrm_text1_trace(module, params, tokens: List[int]) -> Dict[str, Any]:
  """{'halt_probs': [layers, steps, positions], 'expected_updates': [positions]} for one prompt."""
  out = jax.jit(functools.partial(module.apply, method=module.ponder))({"params": params},
                                                                      jnp.asarray([tokens], jnp.int32))
  return {"halt_probs": np.asarray(out["halt_probs"])[:, :, 0, :].tolist(),
          "expected_updates": np.asarray(out["expected_updates"])[0].tolist()}


def modes(requested: List[str]) -> Dict[str, tuple]:
  """{mode: (N, T)}: the requested reasoning modes (all of them when none is named)."""
  names = requested or list(hrm_model.REASONING_MODES)
  unknown = [m for m in names if m not in hrm_model.REASONING_MODES]
  if unknown:
    raise ValueError(f"unknown reasoning mode(s) {unknown}; choose from {sorted(hrm_model.REASONING_MODES)}")
  return {m: hrm_model.REASONING_MODES[m] for m in names}


def format_hrm(mode: str, trace: Dict[str, Any]) -> List[str]:
  n, t = trace["n_cycles"], trace["t_steps"]
  lines = [f"mode {mode} (N={n} cycles x T={t} steps): {trace['segments']} ACT segment(s); "
           f"ACT steps per position {trace['steps']}"]
  for s in range(trace["segments"]):
    for c in range(n):
      first = (s * n + c) * t
      l_part = " ".join(f"{v:.2f}" for v in trace["l_norms"][first:first + t])
      lines.append(f"  segment {s + 1} cycle {c + 1}: |z_L| after L-steps {l_part}; "
                   f"|z_H| after H-update {trace['h_norms'][s * n + c]:.2f}")
    margin = " ".join(f"{v:+.2f}" for v in trace["halt_margin"][s])
    lines.append(f"  segment {s + 1} halt margin q_halt-q_continue per position: {margin}")
  return lines


def format_hrm_text1(trace: Dict[str, Any]) -> List[str]:
  lines = []
  for layer, per_step in enumerate(trace["halt_probs"]):
    lines.append(f"layer {layer}: " + " | ".join(" ".join(f"{p:.3f}" for p in step) for step in per_step))
  lines.append("expected block-pair updates per position: "
               + " ".join(f"{v:.2f}" for v in trace["expected_updates"]))
  return lines


def plot_hrm(traces: Dict[str, Dict[str, Any]], path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_norm, ax_steps) = plt.subplots(2, 1, figsize=(9, 7))
  for mode, tr in traces.items():
    per_h = tr["t_steps"]
    l_x = np.arange(1, len(tr["l_norms"]) + 1)
    line, = ax_norm.plot(l_x, tr["l_norms"], label=f"{mode} |z_L|")
    ax_norm.plot(np.arange(1, len(tr["h_norms"]) + 1) * per_h, tr["h_norms"], "o--", color=line.get_color(),
                 label=f"{mode} |z_H|")
    ax_steps.plot(np.arange(len(tr["steps"])), tr["steps"], "o-", label=mode)
  ax_norm.set(xlabel="L-step (H-updates after every T-th)", ylabel="state norm", title="HRM reasoning states")
  ax_steps.set(xlabel="position", ylabel="ACT segments", title="halting steps per position")
  ax_norm.legend(fontsize=7)
  ax_steps.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_hrm_text1(trace: Dict[str, Any], path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  probs = np.asarray(trace["halt_probs"])  # [layers, steps, positions]
  fig, (ax_p, ax_e) = plt.subplots(2, 1, figsize=(9, 7))
  image = ax_p.imshow(probs.reshape(-1, probs.shape[-1]), aspect="auto", cmap="viridis")
  ax_p.set(xlabel="position", ylabel="layer x pondering step", title="HRM-Text1 halt probabilities")
  fig.colorbar(image, ax=ax_p)
  ax_e.bar(np.arange(probs.shape[-1]), trace["expected_updates"])
  ax_e.set(xlabel="position", ylabel="expected updates")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
