"""Optimus Prime (nik3348/optimus-prime): `checkpoints/best_model.pt` (and latest_model.pt).

The file is torch.save({"epoch", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict",
"val_loss", "config"}), where "config" is a pickled `config.TrainingConfig` dataclass (read as an inert record).
The model config is not stored: vocab, width, depth, kv width and MLP width come from tensor shapes; the number
of query heads cannot (q_proj is [D, D] for any head count): --num-heads, else `num_heads` of a config.json
beside the file, else the original default 8.
Architecture: pre-RMSNorm (eps = float32 machine eps), torchtune GQA attention without biases, interleaved RoPE
(theta 10000, non-persistent buffers), SwiGLU w3(w1(x) * silu(w2(x))) with biases, untied head without bias.
"""
from __future__ import annotations

import collections
import sys
from typing import Any, Dict, Mapping

import numpy as np

from convert import family as fam
from convert import jsonable, layout, torchfile
from convert.errors import ConversionError
from convert.table import COPY, LINEAR, Layers, Row, Table, decoder_sizes, dense, heads_in, heads_out, norm
from convert.unpickle import inert_class

DEFAULT_NUM_HEADS = 8           # ModelConfig.num_heads
DEFAULT_NUM_KV_HEADS = 2        # ModelConfig.num_kv_heads
RMS_EPS = float(np.finfo(np.float32).eps)  # nn.RMSNorm(eps=None) uses finfo(dtype).eps
DEFAULT_MAX_LENGTH = 512       # TrainingConfig.max_length (torchtune's RoPE cache would allow 4096)
TOP_LEVEL_KEYS = ("epoch", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "val_loss", "config")
# Defaults of config.TrainingConfig, in field order (written when exporting a model trained in jaxlm).
TRAINING_CONFIG = collections.OrderedDict([
    ("batch_size", 8), ("max_length", 512), ("learning_rate", 1e-4), ("weight_decay", 0.01), ("num_epochs", 5),
    ("train_val_split", 0.9), ("gradient_clip_val", 1.0), ("dataset_name", "databricks/databricks-dolly-15k"),
    ("dataset_size", 1000), ("num_workers", 4), ("checkpoint_dir", "checkpoints"), ("tensorboard_dir", "runs")])
# AdamW(lr=1e-4, weight_decay=0.01) after the warmup scheduler's first (step 0, lr 0) update.
DEFAULT_ADAMW_GROUP = {"lr": 0.0, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0.01, "amsgrad": False,
                       "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                       "fused": None, "decoupled_weight_decay": True, "initial_lr": 0.0001}
DEFAULT_SCHEDULER = {"warmup_steps": 56, "total_steps": 565, "min_lr": 0, "base_lrs": [0.0001], "last_epoch": 0,
                     "_step_count": 1, "_is_initial": False, "_get_lr_called_within_step": False, "_last_lr": [0.0]}
# Tensors the format fixes (export refuses anything else).
FIXED = {"arch": "decoder", "norm": "rms", "attn_bias": False, "mlp_bias": True, "head_bias": False,
         "tie_embeddings": False}
# What the original computes with them: causal full attention, RMSNorm eps = float32 machine eps, SwiGLU, torchtune's
# interleaved RoPE with theta 10000 (its RoPE buffers are not saved, so theta cannot travel in the file).
ORIGINAL_COMPUTATION = {"causal": True, "attention_window": 0, "norm_eps": RMS_EPS, "rope_theta": 10000.0,
                        "glu": "silu", "rope_style": "interleaved"}
BLOCK_MODULES = ("", ".norm1", ".attn", ".attn.q_proj", ".attn.k_proj", ".attn.v_proj", ".attn.output_proj",
                 ".attn.pos_embeddings", ".norm2", ".mlp", ".mlp.w1", ".mlp.w2", ".mlp.w3", ".dropout")


# One description of the tensors for read, write and the shape check.
TABLE = Table([
    Row("embed.weight", "embed/embedding", COPY, "v,d"),
    Layers("layers.{i}.", (
        *norm("norm1", "attn_norm"),
        Row("attn.q_proj.weight", "attn/query/kernel", heads_in("n"), "d,d"),
        Row("attn.k_proj.weight", "attn/key/kernel", heads_in("k"), "k*hd,d"),
        Row("attn.v_proj.weight", "attn/value/kernel", heads_in("k"), "k*hd,d"),
        Row("attn.output_proj.weight", "attn/out/kernel", heads_out("n"), "d,d"),
        *norm("norm2", "mlp_norm"),
        *dense("mlp.w1", "mlp/wi", LINEAR, COPY, "f,d", slot=0),  # value = w1, gate = w2 (silu is applied to w2)
        *dense("mlp.w2", "mlp/wi", LINEAR, COPY, "f,d", slot=1),
        *dense("mlp.w3", "mlp/wo", LINEAR, COPY, "d,f"))),
    *norm("norm", "final_norm"),
    Row("head.weight", "head/kernel", LINEAR, "v,d")])


def _state_of(obj):
  """(state_dict, wrapped): the checkpoint dict's model_state_dict, or a bare state_dict."""
  if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), Mapping):
    return obj["model_state_dict"], True
  return obj, False


def _num_heads(options, side, src) -> tuple:
  if getattr(options, "num_heads", None):
    return int(options.num_heads), "--num-heads"
  if side and "num_heads" in side:
    return int(side["num_heads"]), "config.json beside the checkpoint"
  print(f"note: {src} does not store the number of attention heads; using the original default "
        f"{DEFAULT_NUM_HEADS} (pass --num-heads if the model was built with another value)", file=sys.stderr)
  return DEFAULT_NUM_HEADS, "original default"


class OptimusPrime(fam.Family):
  name = "optimus_prime"
  title = "Optimus Prime"
  original_computation = ORIGINAL_COMPUTATION
  summary = "Optimus Prime best_model.pt (dict with model_state_dict and a pickled TrainingConfig)"
  default_filename = "best_model.pt"

  def add_arguments(self, parser):
    parser.add_argument("--num-heads", type=int, default=None,
                        help="optimus_prime: query heads (not stored in the checkpoint). Default: num_heads of a "
                             "config.json beside the checkpoint if present, else 8 (the original ModelConfig)")

  def sniff(self, src, obj):
    state, _ = _state_of(obj)
    return isinstance(state, Mapping) and "layers.0.attn.q_proj.weight" in state and "layers.0.mlp.w1.weight" in state

  def read(self, src, obj, options):
    if not self.sniff(src, obj):
      raise ConversionError(f"{src}: not an Optimus Prime checkpoint (expected 'model_state_dict' with "
                            "'layers.0.attn.q_proj.weight')")
    state, wrapped = _state_of(obj)
    for key in ("embed.weight", "layers.0.attn.k_proj.weight", "layers.0.mlp.w1.weight"):
      if key not in state:
        raise ConversionError(f"{src}: missing tensor {key!r}")
    v, d = state["embed.weight"].shape
    kv_dim, f = state["layers.0.attn.k_proj.weight"].shape[0], state["layers.0.mlp.w1.weight"].shape[0]
    n_layers = layout.count_by_prefix(list(state), "layers.", ".norm1.weight")
    side = fam.read_sidecar(src)
    n, heads_from = _num_heads(options, side, src)
    if n <= 0 or d % n:
      raise ConversionError(f"{src}: {n} heads ({heads_from}) do not divide dim {d} (embed.weight)")
    hd = d // n
    if kv_dim % hd or n % (kv_dim // hd or 1) or not kv_dim:
      raise ConversionError(f"{src}: layers.0.attn.k_proj.weight has {kv_dim} rows, not a whole number of kv "
                            f"heads of head_dim {hd} dividing {n} heads ({heads_from})")
    k = kv_dim // hd
    for key, value in (("vocab_size", v), ("dim", d), ("depth", n_layers), ("num_kv_heads", k)):
      if side and key in side and side[key] != value:
        raise ConversionError(f"{src}: config.json beside the checkpoint says {key}={side[key]!r} but the "
                              f"tensors say {value} (with {n} heads)")
    sizes = {"v": v, "d": d, "n": n, "k": k, "hd": hd, "f": f, "n_layers": n_layers}
    state = layout.check_state_dict(state, TABLE.schema(sizes), src)
    params = TABLE.read(state, sizes, src)
    model = {"arch": "decoder", "family": self.name, "vocab_size": v, "d_model": d, "n_layers": n_layers, "n_heads": n,
             "n_kv_heads": k, "head_dim": hd, "d_ff": f, "norm": "rms", "norm_eps": RMS_EPS,
             "rope_style": "interleaved", "rope_theta": 10000.0, "glu": "silu", "attn_bias": False,
             "mlp_bias": True, "head_bias": False, "tie_embeddings": False, "causal": True,
             "attention_window": 0, "dropout": 0.0, "attention_dropout": 0.0, "embed_init_std": 0.02,
             "init_std": 0.02, "max_seq_len": _max_length(obj if wrapped else None)}
    notes = [f"num_heads={n} from {heads_from}"]
    extras: Dict[str, Any] = {}
    if wrapped:
      extras = {key: obj[key] for key in obj if key != "model_state_dict"}
      extras["keys"] = list(obj)
      optimizer = torchfile.empty_optimizer_state(obj.get("optimizer_state_dict"), _n_params(n_layers))
      if optimizer is not None:
        if obj["optimizer_state_dict"].get("state"):
          notes.append("the optimizer's per-parameter moments were dropped (only its hyper-parameters are kept)")
        extras["optimizer_state_dict"] = optimizer
    source = {"family": self.name, "file": src, "wrapped": wrapped, "dtypes": layout.source_dtypes(state),
              "extras": jsonable.encode(extras, "checkpoint"), "notes": notes}
    tokenizer = {"kind": "gpt2", "assets_dir": None} if v == 50257 else {
        "kind": "ids", "vocab_size": v, "note": "the original uses GPT-2 BPE; this vocabulary is not GPT-2's"}
    return fam.Imported(model, params, tokenizer, source)

  def check(self, model, params):
    fam.require(model, {**FIXED, "head_dim": model["d_model"] // model["n_heads"]}, self.title)
    fam.window_of(model)

  def write(self, model, params, source, tokenizer, out, options):
    n, k, d = model["n_heads"], model["n_kv_heads"], model["d_model"]
    if (n, k) != (DEFAULT_NUM_HEADS, DEFAULT_NUM_KV_HEADS) or model["d_ff"] != 4 * d:
      print(f"note: build the original with ModelConfig(vocab_size={model['vocab_size']}, dim={d}, "
            f"depth={model['n_layers']}, num_heads={n}, num_kv_heads={k}) and mlp_ratio={model['d_ff'] / d:g}; "
            "the checkpoint does not store these", file=sys.stderr)
    items = TABLE.write(params, decoder_sizes(model))
    modules = ["", "embed", "layers"] + [f"layers.{i}{m}" for i in range(model["n_layers"]) for m in BLOCK_MODULES]
    state = torchfile.state_dict(layout.to_dtypes(items, source.get("dtypes")), modules + ["norm", "head"])
    if source and not source.get("wrapped", True):
      torchfile.save(state, out)
      return
    torchfile.save(self._checkpoint(model, state, jsonable.decode(source.get("extras") or {})), out)

  def _checkpoint(self, model, state, extras) -> Dict[str, Any]:
    n_params = _n_params(model["n_layers"])
    config = extras.get("config")
    if config is None:
      config = inert_class("config", "TrainingConfig").__new__(inert_class("config", "TrainingConfig"))
      config.state = dict(TRAINING_CONFIG)
    entries = {
        "epoch": extras.get("epoch", 0), "model_state_dict": state,
        "optimizer_state_dict": torchfile.empty_optimizer_state(extras.get("optimizer_state_dict"), n_params) or {
            "state": {}, "param_groups": [{**DEFAULT_ADAMW_GROUP, "params": list(range(n_params))}]},
        "scheduler_state_dict": extras.get("scheduler_state_dict", DEFAULT_SCHEDULER),
        "val_loss": extras.get("val_loss", float("inf")), "config": config}
    for key, value in extras.items():  # anything else the source file had
      if key not in entries and key != "keys":
        entries[key] = value
    order = [k for k in extras.get("keys", TOP_LEVEL_KEYS) if k in entries]
    return {k: entries[k] for k in order + [k for k in entries if k not in order]}


def _max_length(obj) -> int:
  """TrainingConfig.max_length from the pickled config record, if the checkpoint has one."""
  state = getattr(obj.get("config"), "state", None) if isinstance(obj, dict) else None
  value = state.get("max_length") if isinstance(state, dict) else None
  return int(value) if isinstance(value, int) and value > 0 else DEFAULT_MAX_LENGTH


def _n_params(n_layers: int) -> int:
  return 1 + 12 * n_layers + 2  # embed; per layer 12; final norm and head


fam.register(OptimusPrime())
