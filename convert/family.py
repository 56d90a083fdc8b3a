"""What a checkpoint family provides, the registry of families, and the checks an export shares.

A family reads one original format into a jaxlm model directory (`read`) and writes a jaxlm model back in that
format (`write`). Each module registers its family on import; the CLI never branches on family names.
"""
from __future__ import annotations

import abc
import argparse
import dataclasses
import sys
from typing import Any, Dict, Mapping, Optional

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
  summary: str = ""
  default_filename: str = ""      # used when jax2torch --out is an existing directory
  writes_directory: bool = False  # True when the format is a folder (Hugging Face)

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

  def filename(self, model: Mapping[str, Any], source: Mapping[str, Any]) -> str:
    return self.default_filename

  def sidecars(self, model: Mapping[str, Any], source: Mapping[str, Any],
               tokenizer: Mapping[str, Any]) -> Dict[str, bytes]:
    """Files the original code reads from beside its checkpoint, {file name: bytes}; jax2torch writes them next
    to --out once the checkpoint itself is in place."""
    return {}


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


def warn_behaviour(model: Mapping[str, Any], original: Mapping[str, Any], family: str) -> None:
  """Flags the original code hard-codes: the weights load, but the original computes differently."""
  for key, value in original.items():
    have = model.get(key)
    if have != value:
      print(f"warning: model.{key} = {have!r} but the original {family} code uses {value!r}; the exported "
            f"weights load, yet the original code will not reproduce this model's outputs", file=sys.stderr)


def window_of(model: Mapping[str, Any]) -> int:
  """The single attention window of a model (per-layer windows cannot be written to any original)."""
  w = model.get("attention_window", 0)
  if isinstance(w, (list, tuple)):
    if len(set(w)) != 1:
      raise ConversionError(f"model.attention_window {list(w)} varies per layer; no original format has that")
    w = w[0]
  return int(w)


def read_sidecar(src: str) -> Optional[Dict[str, Any]]:
  """The original project's config.json beside a checkpoint file, if there is one (values not in the file)."""
  import json
  import os
  path = os.path.join(os.path.dirname(os.path.abspath(src)), "config.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConversionError(f"{path}: cannot read the config beside the checkpoint ({e})") from None
  return data if isinstance(data, dict) else None
