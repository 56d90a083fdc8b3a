"""A model's lineage: the top-level `history` list of config.json in workdirs and model directories.

One entry per training stage, oldest first:
  {"corpus", "steps", "tokens", "chars", "vocab_size", "params", "started", "finished", "from", "events"}
`tokens` = steps x batch x sequence length; `chars` the characters those tokens decode to (equal to tokens for
character tokenizers); `started`/`finished` ISO-8601 UTC times (`finished` None while the stage runs or after an
interruption); `from` the parent path the stage started from; `events` growth events
({"kind": "vocab"|"layers", "step", ...}). A run started from a parent copies the parent's history and appends
its own entry; jaxlm.grow appends an event to the last entry.

HRM's original checkpoints keep `datasets_trained` (a list of corpus names): imported, each becomes an entry
with only its corpus known; exported, the history's corpora are appended to it.
"""
from __future__ import annotations

import datetime
import json
from typing import Any, Dict, List, Mapping, Optional

from jaxlm import fs

CONFIG_FILE = "config.json"


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read(path: str) -> List[Dict[str, Any]]:
  """The history recorded in `path`/config.json (a workdir or a model directory); [] when there is none. A
  model directory imported from an original without one gets the entries its source fields imply."""
  config_path = fs.join(path, CONFIG_FILE)
  if not fs.exists(config_path):
    return []
  from etils import epath
  try:
    config = json.loads(epath.Path(config_path).read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path} is not valid JSON: {e}") from None
  history = config.get("history")
  if history is None:
    return from_source(config.get("source") or {})
  if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
    raise ValueError(f"{config_path}: \"history\" must be a list of objects, got {type(history).__name__}")
  return [dict(e) for e in history]


def from_source(source: Mapping[str, Any]) -> List[Dict[str, Any]]:
  """Entries for an original's own record (HRM's datasets_trained; its timestamp as the last one's finish)."""
  from convert import jsonable
  names = jsonable.decode(source.get("datasets_trained") or [])
  if not isinstance(names, (list, tuple)):
    return []
  finished = jsonable.decode(source.get("timestamp")) if source.get("timestamp") is not None else None
  entries = [entry(str(name), origin=source.get("family", "original")) for name in names]
  for e in entries:
    e["started"] = None
  if entries and isinstance(finished, str):
    entries[-1]["finished"] = finished
  return entries


def datasets_trained(history: List[Mapping[str, Any]], original: Optional[List[Any]] = None) -> List[str]:
  """HRM's datasets_trained for `history`: the original list, then each later corpus once."""
  names = [str(n) for n in (original or [])]
  for e in history:
    corpus = e.get("corpus")
    if corpus and corpus not in names:
      names.append(str(corpus))
  return names


def entry(corpus: str, *, vocab_size: Optional[int] = None, params: Optional[int] = None,
          origin: Optional[str] = None) -> Dict[str, Any]:
  return {"corpus": corpus, "steps": 0, "tokens": 0, "chars": 0, "vocab_size": vocab_size, "params": params,
          "started": now(), "finished": None, "from": origin, "events": []}


def with_progress(history: List[Dict[str, Any]], *, steps: int, tokens: int, chars: Optional[int],
                  finished: bool = False) -> List[Dict[str, Any]]:
  """A copy of `history` whose last entry records `steps`, `tokens`, `chars` (and its finish time)."""
  history = [dict(e) for e in history]
  last = history[-1]
  last.update(steps=int(steps), tokens=int(tokens), chars=None if chars is None else int(chars))
  last["finished"] = now() if finished else None
  return history


def with_event(history: List[Dict[str, Any]], event: Mapping[str, Any]) -> List[Dict[str, Any]]:
  """A copy of `history` with `event` added to the last entry's events (an entry is made if there is none)."""
  history = [dict(e) for e in history] or [entry("", origin=None)]
  history[-1]["events"] = list(history[-1].get("events") or []) + [dict(event)]
  return history
