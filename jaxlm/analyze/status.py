"""What a checkpoint is: family, parameters, vocabulary, lineage, timestamps and compatibility flags.

Works on a model directory or a training workdir without loading the weights (parameter counts come from the
config's shapes). Compatibility flags are the settings in which jaxlm can compute like an original; for a model
of a family that convert knows, each flag is shown with the original's value and marked where they differ.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Dict, List

import numpy as np

from jaxlm import lineage, modeldir

# Model fields that choose between an original's behaviour and jaxlm's (see each configs/<family>.py).
COMPATIBILITY_FIELDS = ("causal", "rope_style", "glu", "norm", "norm_eps", "norm_position", "attention_window",
                        "q_head_pool", "act_batch_halt", "mlp_rounding", "init_state", "grad_mode", "train_mode",
                        "loss_fn", "ponder_loss", "exit_over_padding", "tie_embeddings")


def _config_of(path: str) -> Dict[str, Any]:
  config = modeldir.read_config(path)
  if modeldir.is_workdir(path) and "model" not in config:
    raise ValueError(f"{path}/config.json has no \"model\" section")
  return config


def _originals(family: str) -> Dict[str, Any]:
  """The original's values of its compatibility flags (convert's record), {} for an unknown family."""
  try:
    from convert.family import FAMILIES
    import convert  # noqa: F401  (registers the families)
  except ImportError:
    return {}
  fam = FAMILIES.get(family)
  return dict(fam.original_computation) if fam else {}


def _modified(path: str) -> str:
  stamp = os.path.getmtime(os.path.join(path, modeldir.CONFIG_FILE))
  return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).isoformat(timespec="seconds")


def status(path: str) -> Dict[str, Any]:
  config = _config_of(path)
  model = dict(config["model"])
  shapes = modeldir.expected_param_shapes(model)
  tokenizer: Dict[str, Any] = {"kind": (config.get("tokenizer") or {}).get("kind")}
  try:
    from jaxlm.data.tokenizers import load_tokenizer
    tok = load_tokenizer(path)
    tokenizer.update(kind=tok.kind, size=tok.vocab_size)
  except (FileNotFoundError, ValueError, ImportError) as e:
    tokenizer["error"] = str(e)
  family = model.get("family") or (config.get("source") or {}).get("family") or ""
  originals = _originals(family)
  flags = {k: {"value": model.get(k), **({"original": originals[k]} if k in originals else {})}
           for k in COMPATIBILITY_FIELDS if k in model or k in originals}
  history = lineage.read(path)
  return {"path": os.path.abspath(path), "kind": "training workdir" if modeldir.is_workdir(path) else "model directory",
          "family": family, "arch": model.get("arch"),
          "parameters": int(sum(int(np.prod(s)) for s in shapes.values())), "tensors": len(shapes),
          "vocab_size": model.get("vocab_size"), "tokenizer": tokenizer, "history": history,
          "timestamps": {"config_written": _modified(path),
                         "first_started": next((h.get("started") for h in history if h.get("started")), None),
                         "last_finished": next((h.get("finished") for h in reversed(history) if h.get("finished")),
                                               None)},
          "source_file": (config.get("source") or {}).get("file"), "compatibility": flags}


def format_status(info: Dict[str, Any]) -> List[str]:
  tok = info["tokenizer"]
  lines = [f"{info['kind']}: {info['path']}",
           f"family {info['family'] or '-'} (arch {info['arch']}), {info['parameters']:,} parameters in "
           f"{info['tensors']} tensors",
           f"vocabulary: model {info['vocab_size']} ids; tokenizer {tok.get('kind')}"
           + (f" with {tok['size']} ids" if "size" in tok else f" ({tok.get('error', 'none')})")]
  if info["source_file"]:
    lines.append(f"converted from {info['source_file']}")
  stamps = info["timestamps"]
  lines.append(f"timestamps: config written {stamps['config_written']}, first stage started "
               f"{stamps['first_started'] or '-'}, last stage finished {stamps['last_finished'] or '-'}")
  lines.append(f"history: {len(info['history'])} stage(s)")
  for i, h in enumerate(info["history"]):
    events = ", ".join(e.get("kind", "?") for e in h.get("events") or [])
    lines.append(f"  {i + 1}. corpus {h.get('corpus')}: steps {h.get('steps')}, tokens {h.get('tokens')}, "
                 f"chars {h.get('chars')}, vocab {h.get('vocab_size')}, params {h.get('params')}, "
                 f"{h.get('started') or '?'} -> {h.get('finished') or '?'}" + (f"; events {events}" if events else ""))
  lines.append("compatibility flags (value; the original's where convert knows it):")
  for name, flag in info["compatibility"].items():
    note = ""
    if "original" in flag:
      note = " = original" if flag["original"] == flag["value"] else f" (original: {flag['original']!r})"
    lines.append(f"  {name}: {flag['value']!r}{note}")
  return lines
