"""Starting a run from existing weights: `--config.train.init_from=PATH` (+ `train.init_which`, `init_optimizer`).

PATH is a model directory (written by convert or jaxlm.grow) or another run's workdir (its latest or best
checkpoint). The parent decides what is trained: its architecture and compatibility flags replace the config's
model section (the config keeps the fields that only change the computation or the layout: dtype, remat,
attention implementation, scan_layers, vocab_multiple), and its tokenizer becomes the run's. The run starts at
step 0 in its own workdir with the parent's parameters and a fresh optimizer, or, with `init_optimizer`, the
parent workdir's optimizer state (same arrays only).

Every process reads the parent itself (it is on storage they all share, as the workdir is); the primary alone
writes the run's tokenizer. Nothing here writes into the parent.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Mapping, NamedTuple, Optional

import jax
import ml_collections
import numpy as np

from jaxlm import fs, modeldir
from jaxlm.models import layout
from jaxlm.models.config_base import COMPUTE_ONLY_FIELDS

log = logging.getLogger("jaxlm.train")

# Fields the run's config keeps over the parent's: how it computes and lays out, not what it computes.
RUN_FIELDS = tuple(COMPUTE_ONLY_FIELDS) + ("scan_layers", "vocab_multiple")


class Parent(NamedTuple):
  path: str
  which: str
  model_dict: Dict[str, Any]     # canonical: per-block, unpadded
  params: Any                    # canonical numpy params
  tokenizer_dir: Optional[str]
  source: Dict[str, Any]
  is_workdir: bool


def load_parent(train_cfg) -> Optional[Parent]:
  """The parent named by train.init_from (None when empty); errors name the path."""
  path = str(train_cfg.get("init_from", "") or "")
  if not path:
    return None
  which = str(train_cfg.get("init_which", "latest") or "latest")
  if which not in ("latest", "best"):
    raise ValueError(f"train.init_which must be 'latest' or 'best', got {which!r}")
  path = fs.absolute(path)
  if not fs.exists(path):
    raise FileNotFoundError(f"train.init_from={path!r} does not exist")
  is_workdir = modeldir.is_workdir(path)
  if not is_workdir and not fs.exists(fs.join(path, modeldir.CONFIG_FILE)):
    raise FileNotFoundError(f"train.init_from={path!r} is neither a model directory (no config.json) nor a "
                            "training workdir (no checkpoints/)")
  loaded = modeldir.load(path, which)
  tokenizer_dir = loaded.tokenizer_dir
  if tokenizer_dir and not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
    tokenizer_dir = None
  model = dict(loaded.model_dict)
  model.setdefault("family", loaded.source.get("family", ""))
  return Parent(path, which, model, loaded.params, tokenizer_dir, dict(loaded.source), is_workdir)


def adopt_parent(config: ml_collections.ConfigDict, parent: Parent, vocab_size: Optional[int] = None
                 ) -> ml_collections.ConfigDict:
  """A copy of `config` whose model section is the parent's (the run-only fields kept from `config`) with
  `vocab_size` (default: the parent's), and whose data.tokenizer is the parent's tokenizer kind."""
  config = ml_collections.ConfigDict(config.to_dict())
  own = config.model.to_dict()
  model = dict(parent.model_dict)
  model.update({k: own[k] for k in RUN_FIELDS if k in own})
  if not model.get("family"):
    model["family"] = own.get("family", "")
  model["vocab_size"] = int(vocab_size or parent.model_dict["vocab_size"])
  config.model = ml_collections.ConfigDict(model)
  config.data.vocab_size = model["vocab_size"]  # the parent's model decides the vocabulary
  kind = tokenizer_kind(parent)
  if kind and kind != config.data.tokenizer:
    log.info("init_from: data.tokenizer %r -> %r (the parent's tokenizer)", config.data.tokenizer, kind)
    config.data.tokenizer = kind
  return config


def tokenizer_kind(parent: Parent) -> Optional[str]:
  if parent.tokenizer_dir is None:
    return None
  from jaxlm.data import tokenizers
  return tokenizers.load_tokenizer(parent.tokenizer_dir).kind


def seed_tokenizer(parent: Parent, tokenizer_dir: str, tokenizer=None) -> None:
  """Writes the parent's tokenizer (or `tokenizer`, a grown copy of it) as the run's (primary process only)."""
  from jaxlm.data import tokenizers
  if tokenizer is None:
    if parent.tokenizer_dir is None:
      return
    tokenizer = tokenizers.load_tokenizer(parent.tokenizer_dir)
  if fs.is_remote(tokenizer_dir):
    import tempfile
    local = tempfile.mkdtemp(prefix="jaxlm-tokenizer-")
    tokenizer.save(local)
    fs.copy_tree(local, tokenizer_dir)
  else:
    tokenizer.save(tokenizer_dir)


def canonical_model(model_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """The model dict of the canonical layout (per-block, unpadded); archs without those fields keep none."""
  return {**model_dict, **{k: v for k, v in (("scan_layers", False), ("vocab_multiple", 1)) if k in model_dict}}


def to_run_layout(model_dict: Mapping[str, Any], params: Any) -> Any:
  """Canonical params -> the run's layout (vocabulary padded to model.vocab_multiple, blocks stacked when
  model.scan_layers): the inverse of layout.canonical."""
  multiple = int(model_dict.get("vocab_multiple", 1) or 1)
  canonical_dict = canonical_model(model_dict)
  if multiple > 1:
    canonical_dict, params = layout.set_vocab_multiple(canonical_dict, params, multiple)
  if model_dict.get("scan_layers"):
    params = layout.stack_layers(params, int(model_dict["n_layers"]))
  return params


def place(tree: Any, shardings: Any) -> Any:
  """Host numpy arrays (the same on every process) -> global arrays laid out by `shardings`."""
  def one(value, sharding):
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return jax.tree.map(one, tree, shardings)


def initial_params(parent: Parent, model_dict: Mapping[str, Any], params: Any = None) -> Any:
  """The run's first parameters (the parent's, or `params` derived from them), checked against the run's
  model and laid out as it trains."""
  checked = modeldir.check_params(canonical_model(model_dict), parent.params if params is None else params,
                                  where=f"train.init_from={parent.path}")
  return to_run_layout(model_dict, checked)


def restore_parent_state(parent: Parent, abstract_state: Any) -> Any:
  """The parent workdir's latest train state (params and optimizer state) laid out as `abstract_state`, for
  train.init_optimizer; refused, naming why, when the parent is not a workdir or its arrays differ."""
  from jaxlm import checkpoint as ckpt_lib
  from jaxlm import checksum
  import orbax.checkpoint as ocp
  where = f"train.init_optimizer with train.init_from={parent.path!r}"
  if not parent.is_workdir or parent.which != "latest":
    raise ValueError(f"{where}: the optimizer state exists only in a workdir's latest checkpoints (init_which="
                     f"{parent.which!r}; best/ and model directories hold parameters only)")
  manager = ckpt_lib._manager(fs.join(parent.path, "checkpoints"), 1, read_only=True)
  try:
    step = manager.latest_step()
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    recorded = set(meta.get("checksums") or ())
    current = set(checksum.leaf_names(abstract_state))
    if recorded and recorded != current:
      diff = sorted(recorded ^ current)
      raise ValueError(f"{where}: the parent's train state has other arrays than this run's ({len(diff)} differ, "
                       f"e.g. {diff[0]}): use the same opt settings, or leave init_optimizer off")
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # noqa: BLE001: Orbax raises many kinds for shape mismatches
      raise ValueError(f"{where}: the parent's state does not fit this run's ({e}); leave init_optimizer off") from e
  finally:
    manager.close()
  return restored["state"]


def grown_tokenizer(parent: Parent, data_cfg):
  """The parent's tokenizer extended with the characters of the run's corpus it lacks (None when nothing is
  new, or the kind has fixed ids); refused when the parent's model has more ids than its tokenizer (the new ids
  would land on rows that already exist)."""
  from jaxlm.data import sources, tokenizers
  if parent.tokenizer_dir is None:
    return None
  tokenizer = tokenizers.load_tokenizer(parent.tokenizer_dir)
  if not hasattr(tokenizer, "extended"):
    return None
  from jaxlm.data import prepared
  texts = [sources.load_text(str(settings["corpus"]), settings["text_field"], settings["format"])
           for settings, _ in prepared.components(data_cfg)]  # replayed and mixed corpora included
  grown = tokenizer.extended("".join(texts))
  if grown.vocab_size == tokenizer.vocab_size:
    return None
  if int(parent.model_dict["vocab_size"]) != tokenizer.vocab_size:
    raise ValueError(f"train.init_from={parent.path!r}: the corpus {data_cfg.corpus!r} has "
                     f"{grown.vocab_size - tokenizer.vocab_size} characters the parent's tokenizer lacks, but its model "
                     f"has {parent.model_dict['vocab_size']} ids for {tokenizer.vocab_size} tokens: cannot append")
  return grown


def probe_windows(data_cfg, tokenizer, n_old: int, seq_len: int, max_windows: int = 16) -> np.ndarray:
  """Validation windows [N, seq_len] of the run's corpus made of old ids only: the text the grown rows are fitted
  and checked on (the same on every process: the whole split, not a process's rows)."""
  from jaxlm.data import pipeline, sources
  text = sources.load_text(str(data_cfg.corpus), data_cfg.text_field, data_cfg.format)
  _, val = pipeline.split_tokens(np.asarray(tokenizer.encode(text), np.int32), float(data_cfg.val_fraction))
  if len(val) < seq_len:
    val = np.asarray(tokenizer.encode(text), np.int32)
  windows = [val[i:i + seq_len] for i in range(0, len(val) - seq_len + 1, seq_len)]
  windows = [w for w in windows if w.max() < n_old][:max_windows]
  if not windows:
    raise ValueError(f"vocabulary growth: no window of {seq_len} old tokens in {data_cfg.corpus!r} to fit the new "
                     "rows on; lower train.seq_len")
  return np.stack(windows)

