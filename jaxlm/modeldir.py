"""Model directories: the unit that convert writes and score/generate/chat/convert read.

Layout:
  config.json      {"model": {arch + model config fields}, "source": {family, file, ...},
                    "tokenizer": {"file": "tokenizer.json", "kind": ...}}
  params/          Orbax (StandardCheckpointer) tree of float parameters, the flax `params` collection
  tokenizer.json   read by jaxlm.data.tokenizers.load_tokenizer(directory)

A directory is assembled under a hidden temporary name beside its destination and renamed at the end, so a
failed conversion leaves nothing at the destination. `load_for_inference` also accepts a training workdir
(one with `checkpoints/`), via jaxlm.checkpoint.restore_for_inference.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Dict, Iterator, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxlm.models import build_model, layout

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.json"


class Loaded(NamedTuple):
  model_dict: Dict[str, Any]   # config.json "model" (arch + config fields)
  params: Any                  # nested dict of numpy arrays
  tokenizer_dir: Optional[str]
  source: Dict[str, Any]       # config.json "source" ({} for a training workdir)


# ------------------------------------------------------------------------------------------ staging
@contextlib.contextmanager
def staged_output(final_path: str, *, is_dir: bool, overwrite: bool = False) -> Iterator[str]:
  """Yields a path to write instead of `final_path`; moves it there only if the block succeeds.

  The staged path lives in a hidden folder beside the destination and has the destination's base name (torch
  names a checkpoint's inner archive after its file name).
  """
  final_path = os.path.abspath(final_path)
  if os.path.lexists(final_path) and not overwrite:
    raise FileExistsError(f"{final_path} already exists (pass --overwrite to replace it)")
  parent, base = os.path.split(final_path)
  os.makedirs(parent, exist_ok=True)
  stage = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
  staged = os.path.join(stage, base)
  try:
    if is_dir:
      os.mkdir(staged)
    yield staged
    if not os.path.lexists(staged):
      raise FileNotFoundError(f"nothing was written to {staged}")
    if os.path.lexists(final_path):  # overwrite: move the old one into the stage, which is removed below
      os.replace(final_path, os.path.join(stage, base + ".old"))
    os.replace(staged, final_path)
  finally:
    shutil.rmtree(stage, ignore_errors=True)


# ------------------------------------------------------------------------------------------ params
def expected_param_shapes(model_dict: Mapping[str, Any]) -> Dict[str, tuple]:
  """'layers_0/attn/query/kernel' -> shape, for the model `model_dict` describes (no allocation)."""
  _, module = build_model(model_dict)
  tokens = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens))
  params = nn.meta.unbox(abstract["params"])
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def check_params(model_dict: Mapping[str, Any], params: Any, where: str = "params") -> Any:
  """Unboxed float32 numpy copy of `params` after checking its keys and shapes against the model."""
  flat = traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")
  expected = expected_param_shapes(model_dict)
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  if missing or unexpected:
    raise ValueError(f"{where}: parameter tree does not match the model config; "
                     f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}")
  out = {}
  for key, shape in expected.items():
    value = np.asarray(flat[key])
    if value.shape != shape:
      raise ValueError(f"{where}: parameter {key} has shape {value.shape}, the model config needs {shape}")
    out[key] = value.astype(np.float32, copy=False)
  return traverse_util.unflatten_dict(out, sep="/")


# ------------------------------------------------------------------------------------------ write / read
def save_model_dir(out_dir: str, model_dict: Mapping[str, Any], params: Any,
                   tokenizer_json: Optional[Mapping[str, Any]] = None,
                   source: Optional[Mapping[str, Any]] = None, *, overwrite: bool = False,
                   history: Optional[list] = None) -> str:
  """Writes a model directory at `out_dir` (atomically) and returns its absolute path; `history` is its
  lineage (jaxlm.lineage)."""
  import orbax.checkpoint as ocp
  model_dict = dict(model_dict)
  model_dict.setdefault("arch", "decoder")
  params = check_params(model_dict, params)
  from jaxlm import gen_defaults
  source = dict(source or {})
  config = {"model": model_dict, "source": source, "history": list(history or []),
            "generation": gen_defaults.for_family(model_dict.get("family") or source.get("family", ""),
                                                  source.get("generation_config"))}
  if tokenizer_json is not None:
    config["tokenizer"] = {"file": TOKENIZER_FILE, "kind": tokenizer_json.get("kind")}
  with staged_output(out_dir, is_dir=True, overwrite=overwrite) as tmp:
    with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2)
    if tokenizer_json is not None:
      with open(os.path.join(tmp, TOKENIZER_FILE), "w", encoding="utf-8") as f:
        json.dump(dict(tokenizer_json), f, indent=1)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, PARAMS_DIR), params)
    checkpointer.wait_until_finished()
    checkpointer.close()
  return os.path.abspath(out_dir)


def read_config(path: str) -> Dict[str, Any]:
  config_path = os.path.join(path, CONFIG_FILE)
  try:  # an unreadable directory or file is a PermissionError naming it, not "not a model directory"
    f = open(config_path, encoding="utf-8")
  except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
    raise FileNotFoundError(f"{path} is not a model directory: {config_path} does not exist") from None
  with f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_path} is not valid JSON: {e}") from None
  if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
    raise ValueError(f"{config_path} has no \"model\" section")
  return config


def _load_dir(path: str) -> Loaded:
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  config = read_config(path)
  params_path = os.path.join(path, PARAMS_DIR)
  if not os.path.isdir(params_path):
    raise FileNotFoundError(f"{path} is not a model directory: {params_path} does not exist")
  checkpointer = ocp.StandardCheckpointer()
  restored = checkpointer.restore(params_path)
  checkpointer.close()
  params = check_params(config["model"], restored, where=params_path)
  tokenizer_dir = path if os.path.isfile(os.path.join(path, TOKENIZER_FILE)) else None
  model_dict, params = layout.canonical(config["model"], params)
  return Loaded(model_dict, params, tokenizer_dir, config.get("source", {}))


def is_workdir(path: str) -> bool:
  from jaxlm import fs
  return fs.exists(fs.join(path, "checkpoints"))


def load(path: str, which: str = "latest") -> Loaded:
  """A model directory, or a training workdir's latest/best checkpoint."""
  if is_workdir(path):
    from jaxlm.checkpoint import restore_for_inference
    model_dict, params, tokenizer_dir = restore_for_inference(path, which)
    params = check_params(model_dict, params, where=path)
    model_dict, params = layout.canonical(model_dict, params)  # scanned / vocabulary-padded runs too
    return Loaded(model_dict, params, tokenizer_dir, {})
  return _load_dir(path)


def load_model_dir(path: str):
  """(typed config, flax module, params, tokenizer dir or None) of a model directory."""
  loaded = _load_dir(path)
  config, module = build_model(loaded.model_dict)
  return config, module, loaded.params, loaded.tokenizer_dir


def load_for_inference(path: str, which: str = "latest"):
  """Like load_model_dir, but `path` may also be a training workdir (--which latest|best)."""
  loaded = load(path, which)
  config, module = build_model(loaded.model_dict)
  return config, module, loaded.params, loaded.tokenizer_dir
