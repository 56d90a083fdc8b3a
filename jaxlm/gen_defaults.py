"""Each family's generation defaults, stored in config.json as `"generation": {...}` and used by jaxlm.generate
and jaxlm.chat for every setting no flag gives.

The values are the originals' (../shared/reference/<family>/SPEC.md):
  yinggem        temperature 0.9, top_p 0.85, repetition penalty 1.2 dividing the logit (its `generate`)
  hrm            temperature 0.8, top_k 50, stop once the same token has come more than 10 times in a row
  hrm_text1      temperature 0.7, top_k 50, 100 new tokens (its chat_with_model), then its generation_config.json
  optimus_prime  temperature 0.7, top_p 0.9 (its generate_text)
HROM has none: its generate_safely is plain greedy, which loops in a chat; the tools' own defaults apply.
Fields: temperature, top_k, top_p, repetition_penalty, penalty_style, max_new_tokens, repeat_stop (0 = off).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import numpy as np

FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "penalty_style", "max_new_tokens", "repeat_stop")

_OFF = {"top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "penalty_style": "sign", "repeat_stop": 0}
# Every sampling field is set, so a family's defaults do not mix with a tool's own (chat's top_p 0.9).
FAMILY_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "yinggem": {**_OFF, "temperature": 0.9, "top_p": 0.85, "repetition_penalty": 1.2, "penalty_style": "divide"},
    "hrm": {**_OFF, "temperature": 0.8, "top_k": 50, "repeat_stop": 10},
    "hrm_text1": {**_OFF, "temperature": 0.7, "top_k": 50, "max_new_tokens": 100},
    "optimus_prime": {**_OFF, "temperature": 0.7, "top_p": 0.9},
}

# Hugging Face generation_config.json keys that mean the same as ours (HRM-Text1's export format).
_HF_KEYS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
            "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_new_tokens"}


def for_family(family: str, hf_generation_config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """The stored defaults of a `family` model; an HF generation_config's sampling fields win over the family's."""
  out = dict(FAMILY_DEFAULTS.get(family or "", {}))
  for hf_key, ours in _HF_KEYS.items():
    if hf_generation_config and hf_generation_config.get(hf_key) is not None:
      out[ours] = hf_generation_config[hf_key]
  if hf_generation_config and hf_generation_config.get("do_sample") is False:
    out["temperature"] = 0.0  # HF: do_sample=False is greedy whatever the temperature
  return out


def from_config(config: Mapping[str, Any]) -> Dict[str, Any]:
  """The defaults a config.json carries; one written before they were stored gets its family's."""
  if isinstance(config.get("generation"), dict):
    return {k: v for k, v in config["generation"].items() if k in FIELDS}
  model, source = config.get("model") or {}, config.get("source") or {}
  return for_family(model.get("family") or source.get("family", ""), source.get("generation_config"))


def resolve(flags: Mapping[str, Any], stored: Mapping[str, Any], builtin: Mapping[str, Any]) -> Dict[str, Any]:
  """Each setting: the flag when given (not None), else the model's stored default, else the tool's own."""
  return {k: flags[k] if flags.get(k) is not None else stored.get(k, builtin[k]) for k in builtin}


def describe(stored: Mapping[str, Any]) -> str:
  return ", ".join(f"{k} {v}" for k, v in sorted(stored.items())) or "none"


def repeat_stopper(limit: int):
  """A generate listener that stops a row once one token has come more than `limit` times in a row (HRM's
  chat stop); None when limit is 0."""
  if not limit:
    return None
  state = {"last": None, "run": None}

  def listener(tokens, step, finished):
    tokens = np.asarray(tokens)
    if state["last"] is None or step == 0 or state["last"].shape != tokens.shape:
      state["last"], state["run"] = tokens.copy(), np.ones(tokens.shape, np.int64)
    else:
      same = tokens == state["last"]
      state["run"] = np.where(same, state["run"] + 1, 1)
      state["last"] = tokens.copy()
    return state["run"] > limit
  return listener


def combine(*listeners):
  """One listener asking a row to stop when any of `listeners` (None ones skipped) asks."""
  active = [l for l in listeners if l is not None]
  if len(active) <= 1:
    return active[0] if active else None

  def listener(tokens, step, finished):
    stop = np.zeros(np.shape(tokens), bool)
    for l in active:
      asked = l(tokens, step, finished)
      if asked is not None:
        stop = stop | np.asarray(asked, bool)
    return stop
  return listener
