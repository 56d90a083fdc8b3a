"""torch2jax / jax2torch as functions (the CLI and the tests call these)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Tuple

from flax import traverse_util

from convert import differences as diff
from convert import family as fam
from convert import output, torchfile
from convert.errors import ConversionError
from convert import jsonable
from jaxlm import lineage, modeldir


def _options(options: Optional[argparse.Namespace], **kwargs) -> argparse.Namespace:
  merged = dict(vars(options)) if options is not None else {}
  merged.update({k: v for k, v in kwargs.items() if v is not None})
  return argparse.Namespace(**merged)


def _load(src: str) -> Any:
  """The unpickled object of a torch checkpoint file, None for folders and safetensors files.

  Any other file is read as a torch checkpoint, so a truncated or corrupt one gets an error naming it."""
  if not os.path.exists(src):
    raise ConversionError(f"{src}: no such file or directory")
  if os.path.isdir(src) or src.endswith(".safetensors"):
    return None
  return torchfile.load(src)


def detect(src: str) -> Tuple[fam.Family, Any]:
  """(family, unpickled object or None) for a checkpoint file or folder; errors name the file."""
  obj = _load(src)
  for family in fam.FAMILIES.values():
    if family.sniff(src, obj):
      return family, obj
  if obj is None:
    what = "neither a torch checkpoint nor a Hugging Face Llama folder"
  elif isinstance(obj, dict):
    what = f"a torch checkpoint with top-level keys {list(obj)[:6]}"
  else:
    what = f"a torch checkpoint holding a {type(obj).__name__}"
  raise ConversionError(f"{src}: cannot tell the family ({what}); pass --family, one of {sorted(fam.FAMILIES)}")


def torch2jax(src: str, out: str, family: Optional[str] = None, options: Optional[argparse.Namespace] = None,
              overwrite: bool = False, **kwargs) -> str:
  """Reads an original checkpoint and writes a jaxlm model directory at `out`; returns its path."""
  options = _options(options, **kwargs)
  if os.path.lexists(out) and not overwrite:  # fail before reading a (possibly large) checkpoint
    raise ConversionError(f"{out} already exists (pass --overwrite to replace it)")
  if family is None:
    chosen, obj = detect(src)
  else:
    chosen = fam.get(family)
    obj = _load(src)
  imported = chosen.read(src, obj, options)
  imported.source["file"] = os.path.abspath(src)
  params = traverse_util.unflatten_dict(imported.params, sep="/")
  try:
    with output.writing(out):
      return modeldir.save_model_dir(out, imported.model, params, imported.tokenizer, imported.source,
                                     overwrite=overwrite, history=lineage.from_source(imported.source))
  except ValueError as e:  # a parameter tree that does not fit the model: a converter bug or bad sizes
    raise ConversionError(f"{src}: {e}") from None


def _resolved_model(model_dict) -> dict:
  """Every config field of the model's arch, with a decoder's n_kv_heads and head_dim resolved (0 means
  "default" in jaxlm) so a format's checks compare real values."""
  from jaxlm.models import build_model
  config, _ = build_model(model_dict)
  model = config.to_dict()
  for field, resolved in (("n_kv_heads", "kv_heads"), ("head_dim", "resolved_head_dim")):
    if field in model and hasattr(config, resolved):
      model[field] = getattr(config, resolved)
  return model


def _tokenizer_json(tokenizer_dir: Optional[str]) -> dict:
  """The model's tokenizer.json ({} if it has none): formats like Llama's config record its special ids."""
  path = os.path.join(tokenizer_dir, modeldir.TOKENIZER_FILE) if tokenizer_dir else ""
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _loaded_model(src: str, which: str):
  try:
    return modeldir.load(src, which)
  except (FileNotFoundError, ValueError) as e:
    raise ConversionError(str(e)) from None


def _target(src: str, loaded, family: Optional[str]) -> fam.Family:
  name = family or loaded.source.get("family") or loaded.model_dict.get("family")
  if not name:
    raise ConversionError(f"{src}: the model does not say which original format it came from; pass --family, "
                          f"one of {sorted(fam.FAMILIES)}")
  return fam.get(name)


def _export_path(out: str, chosen: fam.Family, model, source) -> str:
  """--out, or for a single-file format given a directory (existing, or --out ending in a separator), the
  original's own file name inside it."""
  if chosen.writes_directory or not output.names_directory(out):
    return os.path.abspath(out)
  return os.path.abspath(os.path.join(out, chosen.filename(model, source)))


def _files_beside(out: str, chosen: fam.Family, sidecars, record: str, note: Optional[bytes]):
  """{path: bytes, or None to remove an old file} written next to --out: the files the original reads beside its
  checkpoint and, for a single-file format, the differences record (None: a stale one of an earlier export goes)."""
  beside = {os.path.join(chosen.sidecar_dir(out), name): data for name, data in sidecars.items()
            if not _holds(os.path.join(chosen.sidecar_dir(out), name), data)}
  if not chosen.writes_directory:
    beside[record] = note
  return beside


def _holds(path: str, data: bytes) -> bool:
  """Whether the file at `path` already has exactly these bytes (a second export beside it needs no --overwrite)."""
  if not os.path.isfile(path):
    return False
  with open(path, "rb") as f:
    return f.read() == data


def _refuse_different_computation(src: str, chosen: fam.Family, differences, record: str, allow: bool) -> None:
  if differences and not allow:
    raise ConversionError(diff.refusal(src, chosen.title, differences, record))


def jax2torch(src: str, out: str, family: Optional[str] = None, which: str = "latest",
              options: Optional[argparse.Namespace] = None, overwrite: bool = False,
              allow_different_computation: bool = False, **kwargs) -> str:
  """Writes a jaxlm model (model directory or training workdir) in an original format; returns the path.

  Refuses (ConversionError) a model the original code would compute differently, unless
  allow_different_computation: then the file is written with a record of the differences beside it."""
  options = _options(options, **kwargs)
  loaded = _loaded_model(src, which)
  chosen = _target(src, loaded, family)
  model = _resolved_model(loaded.model_dict)
  params = traverse_util.flatten_dict(loaded.params, sep="/")
  source = loaded.source if loaded.source.get("family") == chosen.name else {}
  history = lineage.read(src)
  if history and chosen.name == "hrm":  # the original's record of what it has trained on
    original = jsonable.decode(source.get("datasets_trained") or [])
    source = {**source, "datasets_trained": jsonable.encode(lineage.datasets_trained(history, original),
                                                            "datasets_trained")}
  tokenizer = _tokenizer_json(loaded.tokenizer_dir)
  out = _export_path(out, chosen, model, source)
  chosen.check(model, params)
  differences = chosen.differences(model)
  record = diff.record_path(out, chosen.writes_directory)
  _refuse_different_computation(src, chosen, differences, record, allow_different_computation)

  note = diff.record(chosen.name, chosen.title, src, out, differences) if differences else None
  beside = _files_beside(out, chosen, chosen.sidecars(model, source, tokenizer), record, note)
  replace = overwrite or (chosen.writes_directory and output.is_empty_directory(out))
  output.refuse_existing([out], replace)
  output.refuse_existing(beside, overwrite)
  with output.writing(out):
    with modeldir.staged_output(out, is_dir=chosen.writes_directory, overwrite=replace) as tmp:
      chosen.write(model, params, source, tokenizer, tmp, options)
      if note and chosen.writes_directory:  # inside the staged folder, which then moves into place
        output.place({os.path.join(tmp, diff.IN_FOLDER): note}, os.path.dirname(tmp))
      for folder in {os.path.dirname(p) for p, data in beside.items() if data is not None}:
        os.makedirs(folder, exist_ok=True)  # e.g. HROM's tokenizer/ beside checkpoints/
      output.place(beside, os.path.dirname(tmp))
  if differences:
    print(diff.warning(chosen.title, differences, record), file=sys.stderr)
  return out
