"""What a checkpoint family provides, the registry of families, and the checks an export shares.

A family reads one original format into a jaxlm model directory (`read`) and writes a jaxlm model back in that
format (`write`). Each module registers its family on import; the CLI never branches on family names.

An export is checked before anything is written: `check` refuses a model whose tensors the format cannot hold (no
flag changes that), and `differences` lists the compatibility flags for which the original code would compute
something else from the same weights (jax2torch refuses those unless --allow-different-computation; see
convert/differences.py). Only flags that change the forward pass are compared: training-only settings (dropout,
loss options, train_mode, initialisation, remat) do not count, nor does the compute dtype (a precision choice).
"""
from __future__ import annotations

import abc
import argparse
import dataclasses
import json
import os
from typing import Any, Dict, Mapping, Optional

from convert import differences as diff
from convert.errors import ConversionError


@dataclasses.dataclass
class Imported:
  """A checkpoint read into jaxlm terms, ready for jaxlm.modeldir.save_model_dir."""
  model: Dict[str, Any]           # config.json "model"
  params: Dict[str, Any]          # flat {"layers_0/attn/query/kernel": array}
  tokenizer: Dict[str, Any]       # tokenizer.json
  source: Dict[str, Any]          # config.json "source": family, file, dtypes, extras, notes


class Family(abc.ABC):
  name: str = ""
  title: str = ""                 # the original project in messages ("YingGem")
  summary: str = ""
  default_filename: str = ""      # used when jax2torch --out is an existing directory
  writes_directory: bool = False  # True when the format is a folder (Hugging Face)
  # Flags whose values the original code hard-codes (what its torch2jax import writes): flag -> original value.
  original_computation: Mapping[str, Any] = {}

  def add_arguments(self, parser: argparse.ArgumentParser) -> None:
    """Family-specific CLI options (e.g. values the checkpoint does not store)."""

  @abc.abstractmethod
  def sniff(self, src: str, obj: Any) -> bool:
    """Whether `src` is in this format; `obj` is the unpickled torch file, or None if `src` is not one."""

  @abc.abstractmethod
  def read(self, src: str, obj: Any, options: argparse.Namespace) -> Imported:
    ...

  @abc.abstractmethod
  def write(self, model: Mapping[str, Any], params: Mapping[str, Any], source: Mapping[str, Any],
            tokenizer: Mapping[str, Any], out: str, options: argparse.Namespace) -> None:
    """Writes the original format to the path `out` (a file, or a directory if writes_directory).

    model: every DecoderConfig field (n_kv_heads, head_dim resolved); params: flat {"a/b/kernel": array};
    source: config.json "source" when the model came from this family, else {}; tokenizer: tokenizer.json.
    """

  def check(self, model: Mapping[str, Any], params: Mapping[str, Any]) -> None:
    """Raises ConversionError when the format cannot hold the model's tensors (model and params as in write)."""

  def computation_flags(self, model: Mapping[str, Any]) -> Dict[str, Any]:
    """The model's values of the original_computation flags, with settings that compute the same for this model
    written as the original's: a sliding window at least max_seq_len long attends to everything, as no window
    does (the exported checkpoint records max_seq_len as the context). A family drops a flag that cannot matter."""
    values = {key: model.get(key) for key in self.original_computation}
    if "attention_window" in values:
      values["attention_window"] = effective_window(model)
    return values

  def differences(self, model: Mapping[str, Any]) -> diff.Differences:
    """{flag: (the model's value, the original's)} for each flag the original code computes differently."""
    return diff.compare(self.computation_flags(model), self.original_computation)

  def filename(self, model: Mapping[str, Any], source: Mapping[str, Any]) -> str:
    return self.default_filename

  def sidecars(self, model: Mapping[str, Any], source: Mapping[str, Any],
               tokenizer: Mapping[str, Any]) -> Dict[str, bytes]:
    """Files the original code reads from beside its checkpoint, {file name: bytes}; jax2torch writes them next
    to --out once the checkpoint itself is in place."""
    return {}

  def sidecar_dir(self, out: str) -> str:
    """The folder the sidecars' names are relative to, for a checkpoint written at `out`."""
    return os.path.dirname(out)


FAMILIES: Dict[str, Family] = {}


def register(family: Family) -> Family:
  FAMILIES[family.name] = family
  return family


def get(name: str) -> Family:
  if name not in FAMILIES:
    raise ConversionError(f"unknown family {name!r}; known families: {sorted(FAMILIES)}")
  return FAMILIES[name]


def require(model: Mapping[str, Any], fixed: Mapping[str, Any], family: str) -> None:
  """Structural fields the format cannot express differently: a mismatch is an error naming the field."""
  for key, want in fixed.items():
    have = model.get(key)
    if have != want:
      raise ConversionError(f"model.{key} is {have!r}, but the {family} format can only hold {want!r}")


def window_of(model: Mapping[str, Any]) -> int:
  """The single attention window of a model (per-layer windows cannot be written to any original)."""
  w = model.get("attention_window", 0)
  if isinstance(w, (list, tuple)):
    if len(set(w)) != 1:
      raise ConversionError(f"model.attention_window {list(w)} varies per layer; no original format has that")
    w = w[0]
  return int(w)


def effective_window(model: Mapping[str, Any]) -> int:
  """window_of(model), or 0 (full attention) when the window covers the model's whole context."""
  w = window_of(model)
  return 0 if w >= int(model.get("max_seq_len") or 0) > 0 else w


def read_json(path: str, what: str) -> Any:
  """The JSON value in `path`. Content that is not JSON is bad input (a ConversionError naming `what`); an OSError
  (an unreadable file) goes through as it is, a file-system failure that names the path."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f"{path}: cannot read {what} ({e})") from None


def read_sidecar(src: str) -> Optional[Dict[str, Any]]:
  """The original project's config.json beside a checkpoint file, if there is one (values not in the file)."""
  path = os.path.join(os.path.dirname(os.path.abspath(src)), "config.json")
  if not os.path.isfile(path):
    return None
  data = read_json(path, "the config beside the checkpoint")
  return data if isinstance(data, dict) else None
