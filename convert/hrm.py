"""HRM text model (EduardTalianu/HRM-_txt, hrm_create_3.py + train_hrm_repo_style_2.py): `hrm_continual_learning.pt`.

The file is torch.save({model_state_dict, optimizer_states: [embedding AdamW, main AdamW], train_state,
tokenizer_vocab, config (model kwargs, forward_dtype a torch dtype), datasets_trained, timestamp,
total_parameters}). The char vocabulary (<PAD>0 <UNK>1 <BOS>2 <EOS>3, then characters in first-occurrence
order) comes from `continual_tokenizer.json` beside the file when present, else from `tokenizer_vocab`.
Architecture: post-norm blocks, fused qkv [q | k | v], rotate-half RoPE (inv_freq buffer), SwiGLU gate_up =
[gate | up], NON-causal attention, Q-head on the sequence mean, z0_L/z0_H (1, 1, D) buffers.
Not stored: N and T (the chat's default 'normal' 2 x 2 is used; jaxlm's --mode / --n / --t change it).
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np

from convert import family as fam
from convert import jsonable, layout, torchfile
from convert.errors import ConversionError
from convert.table import COPY, FLAT, LINEAR, Layers, Row, Table, buffer, chunked, dense, heads_in, heads_out, norm

TOKENIZER_JSON = "continual_tokenizer.json"
SPECIALS = ("<PAD>", "<UNK>", "<BOS>", "<EOS>")
# What the original computes with the weights: bidirectional attention, a Q-head on the sequence mean, a batch that
# halts only when every row wants to, RMSNorm eps 1e-5. Not compared: rope_theta (the saved rope.inv_freq buffer
# carries it), init_state (either way z0_L/z0_H are saved as buffers), mlp_rounding and mlp_multiple (they only set
# the MLP width, which check() compares), n_cycles and t_steps (not stored: the original's chat picks N and T per
# reasoning mode at run time), train_mode, q_learning, loss_fn, grad_mode and halt_exploration_prob (training only).
ORIGINAL_COMPUTATION = {"causal": False, "q_head_pool": "mean", "act_batch_halt": True, "norm_eps": 1e-5}
HALTING_FLAGS = ("q_head_pool", "act_batch_halt")
CONFIG_KEYS = ("vocab_size", "hidden_size", "num_heads", "L_layers", "H_layers", "expansion", "halt_max_steps",
               "halt_exploration_prob", "forward_dtype")
CLASS_DEFAULTS = {"expansion": 4.0, "halt_max_steps": 16, "halt_exploration_prob": 0.1}  # HierarchicalReasoningModel
DEFAULT_N_T = (2, 2)  # hrm_chat's default mode 'normal'
BLOCK_MODULES = ("", ".attention", ".attention.qkv_proj", ".attention.o_proj", ".feed_forward",
                 ".feed_forward.gate_up_proj", ".feed_forward.down_proj", ".norm1", ".norm2")
# The trainer's two AdamW optimizers (created with lr 0, the schedule sets lr each step).
ADAMW_GROUP = {"lr": 0, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0.01, "amsgrad": False,
               "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
               "decoupled_weight_decay": True}
DEFAULT_TRAIN_STATE = {"step": 0, "total_steps": 0, "current_epoch": 0, "best_eval_loss": float("inf"),
                       "training_start_time": 0.0, "optimizer_lrs": [5e-4, 1e-3]}


# ------------------------------------------------------------------------------------------ tokenizer
def tokens_from_vocab(vocab: Mapping[str, Any], where: str) -> List[str]:
  """{token: id} with ids exactly 0..n-1 -> the token list in id order."""
  if not isinstance(vocab, Mapping) or not vocab:
    raise ConversionError(f"{where}: the vocabulary is not a non-empty {{token: id}} mapping")
  by_id = {}
  for token, i in vocab.items():
    if not isinstance(i, int) or isinstance(i, bool) or i in by_id:
      raise ConversionError(f"{where}: token {token!r} has id {i!r} (ids must be distinct integers)")
    by_id[i] = token
  if sorted(by_id) != list(range(len(by_id))):
    raise ConversionError(f"{where}: token ids are not 0..{len(by_id) - 1}")
  return [by_id[i] for i in range(len(by_id))]


def _tokenizer_json(tokens: Sequence[str], level: str) -> Dict[str, Any]:
  ids = {name: (tokens.index(name) if name in tokens else None) for name in SPECIALS}
  return {"kind": "vocab", "level": level, "tokens": list(tokens), "pad_id": ids["<PAD>"],
          "unk_id": ids["<UNK>"], "bos_id": ids["<BOS>"], "eos_id": ids["<EOS>"]}


def _read_tokenizer(src: str, obj: Mapping[str, Any], v: int):
  """(token list, tokenizer json extras, note) from continual_tokenizer.json beside src, else the checkpoint."""
  path = os.path.join(os.path.dirname(os.path.abspath(src)), TOKENIZER_JSON)
  if os.path.isfile(path):
    data = fam.read_json(path, "the tokenizer")
    if not isinstance(data, dict) or "vocab" not in data:
      raise ConversionError(f"{path}: expected {{level, vocab, vocab_size}}, found keys "
                            f"{list(data) if isinstance(data, dict) else type(data).__name__}")
    tokens = tokens_from_vocab(data["vocab"], path)
    if data.get("vocab_size", len(tokens)) != len(tokens):
      raise ConversionError(f"{path}: vocab_size {data['vocab_size']} but {len(tokens)} tokens")
    level, where = data.get("level", "char"), path
  elif "tokenizer_vocab" in obj:
    tokens, level, where = tokens_from_vocab(obj["tokenizer_vocab"], f"{src}: tokenizer_vocab"), "char", src
  else:
    raise ConversionError(f"{src}: no {TOKENIZER_JSON} beside the checkpoint and no 'tokenizer_vocab' in it")
  if len(tokens) > v:
    raise ConversionError(f"{where}: {len(tokens)} tokens but the model's embedding has {v} rows; train the "
                          "model on the grown vocabulary first (the original expands it before training)")
  if level != "char":
    raise ConversionError(f"{where}: tokenizer level {level!r}; only 'char' is supported")
  return tokens, level, where


# ------------------------------------------------------------------------------------------ tensors
# One block of a reasoning module: post-norm, qkv [q | k | v] (view(B, S, 3, heads, hd)), SwiGLU gate_up [gate | up].
BLOCK = (*chunked("attention.qkv_proj", ["attn/query", "attn/key", "attn/value"], heads_in("n"), None, "d,d", False),
         Row("attention.o_proj.weight", "attn/out/kernel", heads_out("n"), "d,d"),
         *chunked("feed_forward.gate_up_proj", [("mlp/wi", 1), ("mlp/wi", 0)], LINEAR, None, "f,d", False),
         Row("feed_forward.down_proj.weight", "mlp/wo/kernel", LINEAR, "d,f"),
         *norm("norm1", "attn_norm"), *norm("norm2", "mlp_norm"))
# One description of the tensors for read, write and the shape check.
TABLE = Table([
    Row("z0_L", "init_L", FLAT, "1,1,d"), Row("z0_H", "init_H", FLAT, "1,1,d"),
    Row("input_embedding.embedding_weight", "embed/embedding", COPY, "v,d"),
    Row("output_head.weight", "head/kernel", LINEAR, "v,d"),
    *dense("q_head", "q_head", LINEAR, COPY, "2,d"),
    Row("rope.inv_freq", None, buffer("inv_freq"), "hd/2"),
    *(Layers(f"{m}.layers.{{i}}.", BLOCK, count, per_block=f"{m}/layers_{{i}}/", stacked=f"{m}/layers/block/")
      for m, count in (("L_module", "l_layers"), ("H_module", "h_layers")))])


def _int_width(expansion: float, d: int) -> int:
  """The original's SwiGLU width: int(expansion * d * 2/3) rounded up to a multiple of 256."""
  width = int(expansion * d * 2 / 3)
  return -(-width // 256) * 256


def _n_params(n_l: int, n_h: int) -> int:
  """Trainable tensors: embedding, output head, q_head weight and bias, 6 per block (buffers excluded)."""
  return 4 + 6 * (n_l + n_h)


# ------------------------------------------------------------------------------------------ family
class HRM(fam.Family):
  name = "hrm"
  title = "HRM"
  original_computation = ORIGINAL_COMPUTATION
  summary = "HRM text model hrm_continual_learning.pt (+ continual_tokenizer.json beside it)"
  default_filename = "hrm_continual_learning.pt"

  def sniff(self, src, obj):
    state = obj.get("model_state_dict") if isinstance(obj, dict) else None
    return isinstance(state, Mapping) and "L_module.layers.0.attention.qkv_proj.weight" in state

  def read(self, src, obj, options):
    if not self.sniff(src, obj):
      raise ConversionError(f"{src}: not an HRM checkpoint (expected a dict whose 'model_state_dict' has "
                            "'L_module.layers.0.attention.qkv_proj.weight')")
    state, config = obj["model_state_dict"], obj.get("config") or {}
    if not isinstance(config, Mapping):
      raise ConversionError(f"{src}: checkpoint entry 'config' is a {type(config).__name__}, not a dict")
    for key in ("input_embedding.embedding_weight", "rope.inv_freq", "L_module.layers.0.feed_forward.down_proj.weight"):
      if key not in state:
        raise ConversionError(f"{src}: missing tensor {key!r}")
    v, d = state["input_embedding.embedding_weight"].shape
    hd = 2 * state["rope.inv_freq"].shape[0]
    f = state["L_module.layers.0.feed_forward.down_proj.weight"].shape[1]
    n_l = layout.count_by_prefix(list(state), "L_module.layers.", ".norm1.weight")
    n_h = layout.count_by_prefix(list(state), "H_module.layers.", ".norm1.weight")
    if not hd or d % hd:
      raise ConversionError(f"{src}: head_dim {hd} (from rope.inv_freq) does not divide hidden_size {d}")
    sizes = {"vocab_size": v, "hidden_size": d, "num_heads": d // hd, "L_layers": n_l, "H_layers": n_h}
    for key, value in sizes.items():
      if key in config and config[key] != value:
        raise ConversionError(f"{src}: checkpoint config {key}={config[key]!r} but the tensors say {value}")
    sizes = {"v": v, "d": d, "n": d // hd, "hd": hd, "f": f, "l_layers": n_l, "h_layers": n_h}
    state = layout.check_state_dict(state, TABLE.schema(sizes), src)
    theta = layout.rope_theta_from_buffer(state["rope.inv_freq"], hd, "rope.inv_freq", src)
    expansion = float(config.get("expansion", CLASS_DEFAULTS["expansion"]))
    if _int_width(expansion, d) != f:
      raise ConversionError(f"{src}: feed_forward width {f} does not follow from expansion {expansion} and hidden "
                            f"size {d} (the original builds {_int_width(expansion, d)})")

    params = TABLE.read(state, sizes, src)
    model = {"arch": "hrm", "family": self.name, "vocab_size": v, "d_model": d, "n_heads": d // hd,
             "l_layers": n_l, "h_layers": n_h, "expansion": expansion, "mlp_rounding": "int", "mlp_multiple": 256,
             "n_cycles": DEFAULT_N_T[0], "t_steps": DEFAULT_N_T[1],
             "halt_max_steps": int(config.get("halt_max_steps", CLASS_DEFAULTS["halt_max_steps"])),
             "halt_exploration_prob": float(config.get("halt_exploration_prob",
                                                       CLASS_DEFAULTS["halt_exploration_prob"])),
             "causal": False, "norm_position": "post", "norm_eps": 1e-5, "rope_theta": theta, "q_head_pool": "mean",
             "act_batch_halt": True, "init_state": "fixed", "grad_mode": "one_step", "train_mode": "single",
             "q_learning": False, "loss_fn": "softmax", "max_seq_len": 64, "dtype": "float32"}
    tokens, level, tok_where = _read_tokenizer(src, obj, v)
    source = {"family": self.name, "file": src, "dtypes": layout.source_dtypes(state),
              "datasets_trained": jsonable.encode(obj.get("datasets_trained", []), "datasets_trained"),
              "timestamp": jsonable.encode(obj.get("timestamp"), "timestamp"),
              "extras": jsonable.encode(self._extras(obj, config, tokens), "checkpoint"),
              "notes": [f"vocabulary of {len(tokens)} tokens from {tok_where}",
                        f"N, T not stored: using the chat default 'normal' {DEFAULT_N_T}",
                        "original behaviour kept: non-causal attention, post-norm, sequence-mean Q-head, "
                        "whole-batch halting, int() MLP width"]}
    return fam.Imported(model, params, _tokenizer_json(tokens, level), source)

  def _extras(self, obj, config, tokens) -> Dict[str, Any]:
    """The checkpoint's non-tensor entries, JSON-able (forward_dtype as its name)."""
    extras = {k: obj[k] for k in ("optimizer_states", "train_state", "total_parameters") if k in obj}
    cfg = dict(config)
    if "forward_dtype" in cfg:
      cfg["forward_dtype"] = np.dtype(cfg["forward_dtype"]).name
    extras["config"] = cfg
    if "tokenizer_vocab" in obj and list(obj["tokenizer_vocab"]) != tokens[:len(obj["tokenizer_vocab"])]:
      extras["tokenizer_vocab"] = obj["tokenizer_vocab"]  # differs from the json beside it: keep it as it was
    elif "tokenizer_vocab" in obj:
      extras["tokenizer_vocab_size"] = len(obj["tokenizer_vocab"])
    extras["keys"] = list(obj)
    return extras

  # ---------------------------------------------------------------------------------------- write
  def sidecars(self, model, source, tokenizer):
    """continual_tokenizer.json, which the original trainer and chat read beside the checkpoint."""
    tokens = tokenizer.get("tokens") or list(tokenizer.get("chars") or "")
    if tokenizer.get("kind") not in ("vocab", "char") or not tokens:
      return {}
    level = tokenizer.get("level", "char")
    payload = {"level": level, "vocab": {t: i for i, t in enumerate(tokens)}, "vocab_size": len(tokens)}
    return {TOKENIZER_JSON: json.dumps(payload).encode("utf-8")}

  def check(self, model, params):
    fam.require(model, {"arch": "hrm", "norm_position": "post"}, self.title)  # no module-final norms in the format
    width = _int_width(model["expansion"], model["d_model"])
    if width != _ff_width(params):
      raise ConversionError(f"the model's MLP width {_ff_width(params)} is not the {width} the original builds from "
                            f"model.expansion={model['expansion']} and hidden size {model['d_model']}")

  def computation_flags(self, model):
    """With one ACT segment (halt_max_steps 1) nothing halts: the halting flags leave the logits alone."""
    values = super().computation_flags(model)
    if model.get("halt_max_steps") == 1:
      for flag in HALTING_FLAGS:
        values.pop(flag)
    return values

  def write(self, model, params, source, tokenizer, out, options):
    sizes = {"l_layers": model["l_layers"], "h_layers": model["h_layers"],
             "inv_freq": layout.torch_rope_inv_freq(model["d_model"] // model["n_heads"], float(model["rope_theta"]))}
    modules = ["", "input_embedding", "output_head", "q_head", "rope"]
    for module, n in (("L_module", model["l_layers"]), ("H_module", model["h_layers"])):
      modules += [module, f"{module}.layers"] + [f"{module}.layers.{i}{m}" for i in range(n) for m in BLOCK_MODULES]
    state = torchfile.state_dict(layout.to_dtypes(TABLE.write(params, sizes), source.get("dtypes")), modules)
    extras = jsonable.decode(source.get("extras") or {})
    torchfile.save(self._checkpoint(model, state, source, extras, tokenizer), out)

  def _checkpoint(self, model, state, source, extras, tokenizer) -> Dict[str, Any]:
    import torch
    n_l, n_h = model["l_layers"], model["h_layers"]
    config = dict(extras.get("config") or {})
    config.update(vocab_size=model["vocab_size"], hidden_size=model["d_model"], num_heads=model["n_heads"],
                  L_layers=n_l, H_layers=n_h, expansion=model["expansion"], halt_max_steps=model["halt_max_steps"],
                  halt_exploration_prob=model["halt_exploration_prob"])
    config["forward_dtype"] = getattr(torch, str(config.get("forward_dtype", "float32")))
    config = {k: config[k] for k in CONFIG_KEYS if k in config} | {k: v for k, v in config.items()
                                                                   if k not in CONFIG_KEYS}
    total = sum(int(np.prod(v.shape)) for k, v in state.items() if k not in ("z0_L", "z0_H", "rope.inv_freq"))
    entries = {
        "model_state_dict": state,
        "optimizer_states": _optimizers(extras.get("optimizer_states"), _n_params(n_l, n_h) - 1),
        "train_state": extras.get("train_state", dict(DEFAULT_TRAIN_STATE)),
        "tokenizer_vocab": self._vocab(extras, tokenizer, model["vocab_size"]),
        "config": config,
        "datasets_trained": jsonable.decode(source.get("datasets_trained") or []),
        "timestamp": jsonable.decode(source.get("timestamp")) or datetime.datetime.now().isoformat(),
        "total_parameters": total,
    }
    order = extras.get("keys") or list(entries)
    return {k: entries[k] for k in order if k in entries} | {k: v for k, v in entries.items() if k not in order}

  def _vocab(self, extras, tokenizer, v: int) -> Dict[str, int]:
    """tokenizer_vocab: the checkpoint's own if it differed from the tokenizer, else the model's tokenizer."""
    if "tokenizer_vocab" in extras:
      return dict(extras["tokenizer_vocab"])
    if tokenizer.get("kind") == "vocab":
      tokens = tokenizer["tokens"][:extras.get("tokenizer_vocab_size", len(tokenizer["tokens"]))]
    elif tokenizer.get("kind") == "char":  # a jaxlm-trained char model: no special tokens
      tokens = tokenizer["chars"]
    else:
      raise ConversionError(f"the original HRM needs a character vocabulary; this model's tokenizer is "
                            f"{tokenizer.get('kind')!r}")
    if len(tokens) > v:
      raise ConversionError(f"tokenizer has {len(tokens)} tokens but the model only {v} ids")
    return {t: i for i, t in enumerate(tokens)}


def _ff_width(params) -> int:
  return int(params["L_module/layers_0/mlp/wo/kernel"].shape[0])


def _optimizers(saved, n_main: int) -> list:
  """[embedding AdamW, main AdamW] state_dicts without moments (they do not survive a conversion), their
  param lists renumbered for this model; the trainer's defaults when the checkpoint had none."""
  groups = [[{**ADAMW_GROUP, "weight_decay": 0.001}], [dict(ADAMW_GROUP)]]
  if isinstance(saved, list) and len(saved) == 2 and all(isinstance(o, dict) and o.get("param_groups") for o in saved):
    groups = [[dict(g) for g in o["param_groups"]] for o in saved]
  out = []
  for groups_i, n in zip(groups, (1, n_main)):
    if len(groups_i) == 1:
      groups_i[0]["params"] = list(range(n))
    out.append({"state": {}, "param_groups": groups_i})
  return out


fam.register(HRM())
