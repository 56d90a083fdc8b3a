"""HROM-V1 (TimurHromek/HROM-V1, HROM_Trainer.py): `checkpoints/hrom_<time>_step<N>.pt`.

Its tokenizer is `tokenizer/hrom_tokenizer.json` in the same working directory (beside `checkpoints/`): torch2jax
reads it from there (or --tokenizer PATH) into the model directory, jax2torch writes it back there.

The file is torch.save({"model": state_dict, "optimizer": AdamW state_dict, "step": int, "config": CONFIG}).
Architecture: pre-LayerNorm (eps 1e-5), fused qkv Linear [3D, D] laid out [q | k | v] (head-major inside each),
rotate-half RoPE whose inv_freq is a saved buffer, FF = Linear(D, 2F) -> a * sigmoid(g) -> Linear(F, D),
biases everywhere, untied head with bias.
"""
from __future__ import annotations

import collections
import os
import time
from typing import Any, Dict, Mapping

from convert import family as fam
from convert import jsonable, layout, torchfile
from convert.errors import ConversionError
from jaxlm.data import hrom_tokenizer
from convert.table import (COPY, LINEAR, Layers, Row, Table, buffer, chunked, decoder_sizes, dense, heads_bias,
                           heads_in, heads_out, norm)

# The original module-level CONFIG (HROM_Trainer.py), in its order; sizes are overwritten per model.
DEFAULT_CONFIG = collections.OrderedDict([
    ("dim", 512), ("n_layers", 6), ("n_heads", 8), ("ff_dim", 2048), ("dropout", 0.1), ("max_seq_len", 1024),
    ("batch_size", 32), ("checkpoint_interval", 1000), ("debug_interval", 500), ("dataset", "daily_dialog"),
    ("vocab_size", 32000), ("tokenizer_train_samples", 100000), ("learning_rate", 3e-4), ("max_turns", 6),
    ("max_checkpoints", 5), ("num_epochs", 50)])
# What HROMTrainer's AdamW(lr=CONFIG["learning_rate"], weight_decay=0.01) holds before its first step.
DEFAULT_ADAMW_GROUP = {"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0.01, "amsgrad": False,
                       "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                       "fused": False, "decoupled_weight_decay": True}
# Special token ids of HROM's BPE tokenizer (trainer order); its tokenizer file is not in the checkpoint.
SPECIAL_IDS = {"pad_id": 0, "bos_id": 1, "eos_id": 2}
# Tensors the format fixes (export refuses anything else).
FIXED = {"arch": "decoder", "norm": "layer", "attn_bias": True, "mlp_bias": True, "head_bias": True,
         "tie_embeddings": False}
# What the original computes with those tensors: causal full attention, LayerNorm eps 1e-5 (torch default), a*sigmoid(g)
# MLP, rotate-half RoPE. rope_theta is not listed: the saved inv_freq buffers carry it into the original.
ORIGINAL_COMPUTATION = {"causal": True, "attention_window": 0, "norm_eps": 1e-5, "glu": "sigmoid", "rope_style": "half"}
BLOCK_MODULES = ("", ".attn", ".attn.qkv", ".attn.proj", ".attn.rotary", ".attn.dropout", ".ff", ".ff.0",
                 ".ff.1", ".ff.2", ".norm1", ".norm2", ".dropout")


# One description of the tensors for read, write and the shape check.
TABLE = Table([
    Row("embed.weight", "embed/embedding", COPY, "v,d"),
    Layers("blocks.{i}.", (
        *chunked("attn.qkv", ["attn/query", "attn/key", "attn/value"], heads_in("n"), heads_bias("n"), "d,d"),
        *dense("attn.proj", "attn/out", heads_out("n"), COPY, "d,d"),
        Row("attn.rotary.inv_freq", None, buffer("inv_freq"), "hd/2"),
        *chunked("ff.0", [("mlp/wi", 0), ("mlp/wi", 1)], LINEAR, COPY, "f,d"),  # chunk(2): value, then gate
        *dense("ff.2", "mlp/wo", LINEAR, COPY, "d,f"),
        *norm("norm1", "attn_norm", has_bias=True),
        *norm("norm2", "mlp_norm", has_bias=True))),
    *norm("norm", "final_norm", has_bias=True),
    *dense("head", "head", LINEAR, COPY, "v,d")])


def _sizes(state: Mapping[str, Any], config: Mapping[str, Any], src: str) -> Dict[str, int]:
  """Model sizes from the tensors, cross-checked against the checkpoint's CONFIG dict."""
  for key in ("embed.weight", "blocks.0.attn.rotary.inv_freq", "blocks.0.ff.2.weight"):
    if key not in state:
      raise ConversionError(f"{src}: missing tensor {key!r}")
  v, d = state["embed.weight"].shape
  hd = 2 * state["blocks.0.attn.rotary.inv_freq"].shape[0]
  sizes = {"vocab_size": v, "dim": d, "n_layers": layout.count_by_prefix(list(state), "blocks.", ".norm1.weight"),
           "n_heads": d // hd if hd else 0, "ff_dim": state["blocks.0.ff.2.weight"].shape[1]}
  for key, value in sizes.items():
    if key in config and config[key] != value:
      raise ConversionError(f"{src}: checkpoint config {key}={config[key]!r} but the tensors say {value}")
  if not hd or d % hd:
    raise ConversionError(f"{src}: head_dim {hd} (from blocks.0.attn.rotary.inv_freq) does not divide dim {d}")
  return sizes


def _tokenizer_path(src: str, options) -> str:
  """--tokenizer, else the original's tokenizer/hrom_tokenizer.json when src sits in its checkpoints/ folder
  ('' when there is none)."""
  given = getattr(options, "tokenizer", None)
  if given:
    if not os.path.isfile(given):
      raise ConversionError(f"--tokenizer {given}: no such file")
    return given
  folder = os.path.dirname(os.path.abspath(src))
  if os.path.basename(folder) != "checkpoints":
    return ""
  beside = os.path.join(os.path.dirname(folder), hrom_tokenizer.ORIGINAL_PATH)
  return beside if os.path.isfile(beside) else ""


def _read_tokenizer(path: str, v: int) -> Dict[str, Any]:
  """tokenizer.json of kind hrom_bpe for the original's file at `path`; refuses one with ids the model lacks."""
  try:
    tok = hrom_tokenizer.HromTokenizer.from_file(path)
  except ValueError as e:
    raise ConversionError(str(e)) from None
  if tok.vocab_size > v:
    raise ConversionError(f"{path}: the tokenizer has {tok.vocab_size} ids but the checkpoint's embedding only {v} "
                          "rows (embed.weight); it belongs to another model")
  return {"kind": tok.kind, **tok._config("")}


class HROM(fam.Family):
  name = "hrom"
  title = "HROM"
  original_computation = ORIGINAL_COMPUTATION
  summary = "HROM-V1 checkpoint hrom_<time>_step<N>.pt (dict with model/optimizer/step/config)"

  def sniff(self, src, obj):
    state = obj.get("model") if isinstance(obj, dict) else None
    return isinstance(state, Mapping) and "blocks.0.attn.qkv.weight" in state

  def read(self, src, obj, options):
    if not self.sniff(src, obj):
      raise ConversionError(f"{src}: not an HROM checkpoint (expected a dict whose 'model' state_dict has "
                            "'blocks.0.attn.qkv.weight')")
    state, config = obj["model"], obj.get("config") or {}
    if not isinstance(config, Mapping):
      raise ConversionError(f"{src}: checkpoint entry 'config' is a {type(config).__name__}, not a dict")
    z = _sizes(state, config, src)
    v, d, n_layers, n, f = z["vocab_size"], z["dim"], z["n_layers"], z["n_heads"], z["ff_dim"]
    hd = d // n
    sizes = {"v": v, "d": d, "n": n, "hd": hd, "f": f, "n_layers": n_layers}
    state = layout.check_state_dict(state, TABLE.schema(sizes), src)
    theta = layout.shared_rope_theta(state, TABLE.buffers(sizes), hd, src)
    params = TABLE.read(state, sizes, src)
    dropout = float(config.get("dropout", DEFAULT_CONFIG["dropout"]))
    model = {"arch": "decoder", "family": self.name, "vocab_size": v, "d_model": d, "n_layers": n_layers,
             "n_heads": n, "n_kv_heads": n, "head_dim": hd, "d_ff": f, "norm": "layer", "norm_eps": 1e-5,
             "rope_style": "half", "rope_theta": theta, "glu": "sigmoid", "attn_bias": True, "mlp_bias": True,
             "head_bias": True, "tie_embeddings": False, "causal": True, "attention_window": 0,
             "dropout": dropout, "attention_dropout": dropout, "embed_init_std": 1.0, "init_std": 0.02,
             "max_seq_len": int(config.get("max_seq_len", DEFAULT_CONFIG["max_seq_len"]))}
    extras = {"step": obj.get("step", 0), "config": config}
    optimizer = torchfile.empty_optimizer_state(obj.get("optimizer"), _n_params(n_layers))
    tok_path = _tokenizer_path(src, options)
    if tok_path:
      notes = [f"tokenizer read from {os.path.abspath(tok_path)}"]
      tokenizer = _read_tokenizer(tok_path, v)
    else:
      notes = ["HROM's own BPE tokenizer (tokenizer/hrom_tokenizer.json) is not part of the checkpoint and was not "
               "found beside its checkpoints/ folder (pass --tokenizer PATH); ids 0-5 are <pad> <s> </s> <unk> "
               "<user> <assistant>"]
      tokenizer = {"kind": "ids", "vocab_size": v, **SPECIAL_IDS,
                   "note": "HROM's BPE tokenizer file is not in the checkpoint; token ids pass through"}
    if optimizer is not None:
      extras["optimizer"] = optimizer
      if obj["optimizer"].get("state"):
        notes.append("the optimizer's per-parameter moments were dropped (only its hyper-parameters are kept)")
    source = {"family": self.name, "file": src, "dtypes": layout.source_dtypes(state),
              "extras": jsonable.encode(extras, "checkpoint"), "notes": notes}
    return fam.Imported(model, params, tokenizer, source)

  def add_arguments(self, parser):
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="HROM's hrom_tokenizer.json (default: tokenizer/hrom_tokenizer.json beside the "
                             "checkpoint's checkpoints/ folder, if there)")

  def sidecars(self, model, source, tokenizer):
    """tokenizer/hrom_tokenizer.json (the original's text as imported or trained), for a model with HROM's tokenizer."""
    if tokenizer.get("kind") != hrom_tokenizer.KIND:
      return {}
    return {hrom_tokenizer.ORIGINAL_PATH: tokenizer["hf_tokenizer"].encode("utf-8")}

  def sidecar_dir(self, out):
    """The original's working directory: the parent of checkpoints/ when --out is in one."""
    folder = os.path.dirname(out)
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder

  def check(self, model, params):
    fam.require(model, {**FIXED, "n_kv_heads": model["n_heads"], "head_dim": model["d_model"] // model["n_heads"]},
                self.title)
    fam.window_of(model)

  def write(self, model, params, source, tokenizer, out, options):
    sizes = decoder_sizes(model)
    sizes["inv_freq"] = layout.torch_rope_inv_freq(sizes["hd"], float(model["rope_theta"]))
    items = layout.to_dtypes(TABLE.write(params, sizes), source.get("dtypes"))
    modules = ["", "embed", "blocks"] + [f"blocks.{i}{m}" for i in range(model["n_layers"]) for m in BLOCK_MODULES]
    state = torchfile.state_dict(items, modules + ["norm", "head"])
    extras = jsonable.decode(source.get("extras") or {})
    torchfile.save(self._checkpoint(model, state, extras), out)

  def filename(self, model, source):
    step = jsonable.decode(source.get("extras") or {}).get("step", 0)
    return f"hrom_{time.strftime('%Y%m%d_%H%M%S')}_step{step}.pt"

  def _checkpoint(self, model, state, extras) -> Dict[str, Any]:
    config = collections.OrderedDict(extras.get("config") or DEFAULT_CONFIG)
    config.update(dim=model["d_model"], n_layers=model["n_layers"], n_heads=model["n_heads"],
                  ff_dim=model["d_ff"], vocab_size=model["vocab_size"], max_seq_len=model["max_seq_len"],
                  dropout=model["dropout"])
    n_params = _n_params(model["n_layers"])
    optimizer = torchfile.empty_optimizer_state(extras.get("optimizer"), n_params) or {
        "state": {}, "param_groups": [{**DEFAULT_ADAMW_GROUP, "lr": config["learning_rate"],
                                       "params": list(range(n_params))}]}
    return {"model": state, "optimizer": optimizer, "step": extras.get("step", 0), "config": dict(config)}


def _n_params(n_layers: int) -> int:
  return 1 + 12 * n_layers + 4  # embed; per block 12 (the inv_freq buffer is no parameter); norm and head


fam.register(HROM())
