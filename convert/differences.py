"""An export never silently changes what the model computes.

Each family lists the compatibility flags whose values its original code hard-codes (`Family.original_computation`,
the values its `original` config variant and torch2jax write). When a jaxlm model differs in one of them, the
original code loads the exported weights but computes something else; jax2torch then refuses, unless
--allow-different-computation is given, in which case it writes the file anyway and records the differences in a
JSON file beside it (inside the folder for folder formats).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Tuple

ALLOW_FLAG = "--allow-different-computation"
SUFFIX = ".jaxlm-differences.json"   # beside a single-file export: <out>.jaxlm-differences.json
IN_FOLDER = "jaxlm-differences.json"  # inside a folder export

Differences = Dict[str, Tuple[Any, Any]]  # flag -> (the model's value, the original's value)

# What each flag changes, for the record.
EFFECTS = {
    "causal": "whether a position attends only to itself and earlier tokens (False: also to later ones)",
    "attention_window": "how many tokens back a position attends (0: all of them)",
    "norm_eps": "the epsilon inside every normalisation",
    "rope_theta": "the rotary embedding's frequencies",
    "rope_style": "which dimensions the rotary embedding rotates together",
    "glu": "the activation of the MLP gate",
    "q_head_pool": "what the halting Q-head reads (each position, or the sequence mean)",
    "act_batch_halt": "whether a batch stops its reasoning segments only when every example wants to",
    "halt_eps": "the clip of the halting probabilities and the early-exit threshold",
}


def record_path(out: str, writes_directory: bool) -> str:
  return os.path.join(out, IN_FOLDER) if writes_directory else out + SUFFIX


def listing(differences: Differences) -> str:
  """'causal: True here, False in the original; norm_eps: ...'"""
  return "; ".join(f"{flag}: {have!r} here, {want!r} in the original" for flag, (have, want) in differences.items())


def refusal(src: str, title: str, differences: Differences, record: str) -> str:
  """The one-line error of a refused export."""
  return (f"{src}: the original {title} code computes differently from this model ({listing(differences)}), so its "
          f"logits would not be jaxlm's; pass {ALLOW_FLAG} to export anyway (the differences are then recorded in "
          f"{os.path.basename(record)})")


def warning(title: str, differences: Differences, record: str) -> str:
  return (f"warning: exported with {ALLOW_FLAG}: the original {title} code computes differently from this model "
          f"({listing(differences)}); recorded in {record}")


def record(family: str, title: str, src: str, written: str, differences: Differences) -> bytes:
  """The JSON written beside an export that the original code does not compute as jaxlm does."""
  data = {
      "format": family,
      "exported": os.path.basename(written),
      "from": os.path.abspath(src),
      "note": (f"Exported with {ALLOW_FLAG}. The original {title} code loads this checkpoint, but it computes "
               "differently from the jaxlm model it came from, because the flags below differ: its outputs (logits, "
               "generated text) will not match jaxlm's."),
      "differences": {flag: {"model": have, "original": want, "affects": EFFECTS.get(flag, "")}
                      for flag, (have, want) in differences.items()},
  }
  return (json.dumps(data, indent=2) + "\n").encode("utf-8")


def compare(values: Mapping[str, Any], original: Mapping[str, Any]) -> Differences:
  """{flag: (value, original value)} for every flag of `original` that `values` holds with another value."""
  return {flag: (values[flag], want) for flag, want in original.items() if flag in values and values[flag] != want}
