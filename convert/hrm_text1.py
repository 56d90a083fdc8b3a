"""HRM-Text1 (julianjjo/HRM_Models, HRMText1 in hrm_training_small_100m.py): the `save_pretrained` folder.

The folder holds config.json (HRMText1Config fields + model_type "hrm_text1"), generation_config.json and the
weights as pytorch_model.bin (torch.save of the state_dict, a plain dict; lm_head.weight is the same tensor as
token_embeddings.weight) or model.safetensors. --src may also name one weights file (a config.json beside it
is then optional: sizes come from the tensors, head_dim from the RoPE buffer).
State dict: token_embeddings, layers.<i>.{H_module,L_module}.{norm1, attn.{q,k,v,out}_proj, attn.rotary_emb.inv_freq,
norm2, mlp.{w1,w2,w3}}, final_norm, lm_head (tied), halt_heads.<i>.0.{weight,bias}; Linear layers have no bias
except the halt heads. The MLP is w3(silu(w1 x) * w2 x): jaxlm's GatedMLP value is w2, its gate w1.

model.safetensors: the original's own save_pretrained cannot write it (transformers 4.55 refuses the shared
tensors of the tie, HRMText1 declares no _tied_weights_keys), so such a file comes from elsewhere: it is read with
either one or both tied keys, and written with both (equal copies; from_pretrained loads it, as it does the bin).
Tokenizer: a T5 vocabulary (>= 32000 ids) gets tokenizer.json {"kind": "sentencepiece"} pointing at jaxlm's
shipped spiece.model with vocab - 32000 extra ids (T5Tokenizer: 32100); smaller vocabularies pass ids through.
"""
from __future__ import annotations

import collections
import json
import os
import sys
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from convert import family as fam
from convert import layout, safetensors_file, torchfile
from convert.errors import ConversionError
from convert.table import COPY, LINEAR, Layers, Row, Table, buffer, dense, heads_in, heads_out, norm

BIN, SAFETENSORS = "pytorch_model.bin", "model.safetensors"
FORMATS = {"bin": BIN, "safetensors": SAFETENSORS}
T5_PIECES = 32000  # the T5 sentencepiece model; len(T5Tokenizer) = 32000 + 100 extra ids
# HRMText1Config as hrm_training_small_100m.py builds it (MODEL_PARAMS), for what a bare weights file lacks.
SCRIPT_CONFIG = {"block_size": 2048, "dropout": 0.1, "halt_max_steps": 8, "ponder_loss_weight": 0.01,
                 "halt_bias_init": -2.2, "use_rotary_embeddings": True, "rotary_embedding_base": 10000,
                 "use_flash_attention": True, "gradient_checkpointing": True}
TRANSFORMERS_VERSION = "4.55.2"  # the release the reference fixture was saved with
# Values the original code hard-codes: an export is refused when the jaxlm model differs (outputs would differ).
# rope_theta is not listed (the saved inv_freq buffers and config.json carry it); dropout and remat are training only.
ORIGINAL_COMPUTATION = {"norm_eps": 1e-6, "halt_eps": 1e-6}
# Flags whose jaxlm default leaves the exported model's logits alone (without padding): a note, not a refusal.
# exit_over_padding only decides whether padding positions hold up the early exit of a padded batch.
TRAINING_FLAGS = {"ponder_loss": ("count", "the original's loss adds the constant update count instead"),
                  "exit_over_padding": (True, "the original's early exit also waits for padding positions; "
                                              "logits of unpadded inputs are the same")}


# ------------------------------------------------------------------------------------------ layout
def _block(m: str):
  """One of a layer's two blocks: pre-norm, bias-free projections, w3(silu(w1 x) * w2 x) (jaxlm value w2, gate w1)."""
  return (*norm(f"{m}.norm1", f"{m}/norm1"),
          *(Row(f"{m}.attn.{t}_proj.weight", f"{m}/attn/{j}/kernel", heads_in("n"), "d,d")
            for t, j in (("q", "query"), ("k", "key"), ("v", "value"))),
          Row(f"{m}.attn.out_proj.weight", f"{m}/attn/out/kernel", heads_out("n"), "d,d"),
          Row(f"{m}.attn.rotary_emb.inv_freq", None, buffer("inv_freq"), "hd/2"),
          *norm(f"{m}.norm2", f"{m}/norm2"),
          *dense(f"{m}.mlp.w1", f"{m}/mlp/wi", LINEAR, None, "f,d", False, slot=1),
          *dense(f"{m}.mlp.w2", f"{m}/mlp/wi", LINEAR, None, "f,d", False, slot=0),
          Row(f"{m}.mlp.w3.weight", f"{m}/mlp/wo/kernel", LINEAR, "d,f"))


# HRMText1.state_dict() order; jaxlm's layers are always scanned ("layers/...", a leading layer axis). lm_head is the
# tied embedding: a file may hold it (tied_copy), it must then be equal, and it is written as the same table.
TABLE = Table([
    Row("token_embeddings.weight", "embed/embedding", COPY, "v,d"),
    Layers("layers.{i}.", _block("H_module") + _block("L_module"), stacked="layers/"),
    *norm("final_norm", "final_norm"),
    Row("lm_head.weight", "embed/embedding", COPY, "v,d", when="tied_copy"),
    Layers("halt_heads.{i}.0.", (Row("weight", "halt_head/kernel", LINEAR, "1,d"),
                                 Row("bias", "halt_head/bias", COPY, "1")), stacked="layers/")], title="HRMText1")


# ------------------------------------------------------------------------------------------ files
def _folder(src: str) -> str:
  return src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))


def _read_json(path: str) -> Optional[Dict[str, Any]]:
  if not os.path.isfile(path):
    return None
  data = fam.read_json(path, "the JSON file")
  if not isinstance(data, dict):
    raise ConversionError(f"{path}: expected a JSON object, found {type(data).__name__}")
  return data


def _weights_file(src: str, choice: Optional[str]) -> str:
  """The weights file to read: --src itself, or in a folder the one --hrm-text1-weights names, else
  model.safetensors when present (as from_pretrained prefers it), else pytorch_model.bin."""
  if os.path.isfile(src):
    return src
  names = [FORMATS[choice]] if choice else [SAFETENSORS, BIN]
  for name in names:
    if os.path.isfile(os.path.join(src, name)):
      return os.path.join(src, name)
  if os.path.isfile(os.path.join(src, SAFETENSORS + ".index.json")):
    raise ConversionError(f"{src}: sharded safetensors checkpoints are not supported (the original's ~117M "
                          "parameters fit one file)")
  raise ConversionError(f"{src}: no {' or '.join(names)} in this folder")


def _load_tensors(path: str, obj: Any) -> Dict[str, np.ndarray]:
  if obj is not None and os.path.isfile(path):
    tensors = obj
  elif path.endswith(".safetensors"):
    tensors = safetensors_file.load(path)
  else:
    tensors = torchfile.load(path)
  if not isinstance(tensors, Mapping):
    raise ConversionError(f"{path}: expected a state_dict (a mapping of tensors), found {type(tensors).__name__}")
  return dict(tensors)


def _rope_theta(inv_freq: np.ndarray, hd: int, key: str, path: str, base: float) -> float:
  """theta of a saved inv_freq buffer. A half-precision buffer (a model saved after .to(bfloat16) casts its
  buffers too) cannot pin theta down: it must equal the float32 table of `base` rounded to its dtype."""
  if inv_freq.dtype == np.float32:
    return layout.rope_theta_from_buffer(inv_freq, hd, key, path)
  want = layout.rope_inv_freq(hd, base).astype(inv_freq.dtype)
  if inv_freq.shape != want.shape or want.tobytes() != inv_freq.tobytes():
    raise ConversionError(f"{path}: RoPE buffer {key} ({inv_freq.dtype}) is not the theta={base:g} table "
                          f"rounded to {inv_freq.dtype}")
  return base


def _json_text(data: Mapping[str, Any]) -> str:
  """transformers' to_json_string: sorted keys, indent 2, trailing newline."""
  return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _write_text(path: str, text: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def _number(x: float):
  """10000.0 -> 10000, as the original config stores integral values."""
  return int(x) if float(x).is_integer() else float(x)


# ------------------------------------------------------------------------------------------ family
class HRMText1Family(fam.Family):
  name = "hrm_text1"
  title = "HRM-Text1"
  original_computation = ORIGINAL_COMPUTATION
  summary = "HRM-Text1 save_pretrained folder (config.json + pytorch_model.bin or model.safetensors)"
  writes_directory = True

  def add_arguments(self, parser):
    parser.add_argument("--hrm-text1-weights", choices=("bin", "safetensors"), default=None,
                        help="hrm_text1: the weights file of the folder to read when it holds both (default "
                             "model.safetensors, as from_pretrained prefers it)")

  def sniff(self, src, obj):
    if isinstance(obj, Mapping):
      return "layers.0.H_module.attn.q_proj.weight" in obj and "halt_heads.0.0.weight" in obj
    if obj is not None:
      return False
    try:
      cfg = _read_json(os.path.join(_folder(src), "config.json"))
    except ConversionError:
      return False
    return bool(cfg) and cfg.get("model_type") == "hrm_text1"

  # ---------------------------------------------------------------------------------- torch -> jaxlm
  def read(self, src, obj, options):
    choice = getattr(options, "hrm_text1_weights", None)
    if choice not in (None, *FORMATS):
      raise ConversionError(f"hrm_text1_weights must be one of {sorted(FORMATS)}, got {choice!r}")
    path = _weights_file(src, choice)
    cfg_path = os.path.join(_folder(src), "config.json")
    cfg = _read_json(cfg_path)
    if cfg is not None and cfg.get("model_type", "hrm_text1") != "hrm_text1":
      raise ConversionError(f"{cfg_path}: model_type is {cfg.get('model_type')!r}, expected 'hrm_text1'")
    tensors = _load_tensors(path, obj)
    (v, d, n_layers, hd, f), theta = self._sizes(tensors, cfg or {}, path, cfg_path)
    sizes = {"v": v, "d": d, "n": d // hd, "hd": hd, "f": f, "n_layers": n_layers,
             "tied_copy": "lm_head.weight" in tensors}
    state = layout.check_state_dict(tensors, TABLE.schema(sizes), path)
    params = TABLE.read(state, sizes, path, stacked=True)
    values = {**SCRIPT_CONFIG, **(cfg or {})}
    if not values.get("use_rotary_embeddings", True):
      raise ConversionError(f"{cfg_path}: use_rotary_embeddings is false (learned position embeddings); jaxlm "
                            "implements the RoPE model only")
    model = self._model_dict(values, v, d, n_layers, d // hd, f, theta)
    gen = _read_json(os.path.join(_folder(src), "generation_config.json"))
    source = {"family": self.name, "file": os.path.abspath(src), "weights_file": os.path.abspath(path),
              "format": "safetensors" if path.endswith(".safetensors") else "bin",
              "dtypes": layout.source_dtypes(state), "tied_copy": sizes["tied_copy"],
              "hf_config": cfg, "generation_config": gen,
              "notes": ["config.json beside the weights" if cfg is not None else
                        "no config.json: halt_max_steps, dropout etc. are the training script's MODEL_PARAMS"]}
    return fam.Imported(model, params, self._tokenizer(v), source)

  @staticmethod
  def _sizes(tensors, cfg, path, cfg_path) -> Tuple[Tuple[int, ...], float]:
    for key in ("token_embeddings.weight", "layers.0.H_module.attn.rotary_emb.inv_freq",
                "layers.0.H_module.mlp.w3.weight"):
      if key not in tensors:
        raise ConversionError(f"{path}: missing tensor {key!r}; not an HRM-Text1 (stacked HRMInner) state_dict")
    v, d = tensors["token_embeddings.weight"].shape
    hd = 2 * tensors["layers.0.H_module.attn.rotary_emb.inv_freq"].shape[0]
    f = tensors["layers.0.H_module.mlp.w3.weight"].shape[1]
    n_layers = layout.count_by_prefix(list(tensors), "layers.", ".H_module.norm1.weight")
    if not hd or d % hd:
      raise ConversionError(f"{path}: head_dim {hd} (from the RoPE buffer) does not divide n_embd {d}")
    for key, value in (("vocab_size", v), ("n_embd", d), ("n_layers", n_layers), ("n_head", d // hd),
                       ("d_ff", f)):
      if key in cfg and cfg[key] != value:
        raise ConversionError(f"{cfg_path}: {key}={cfg[key]!r} but the tensors in {path} say {value}")
    base = cfg.get("rotary_embedding_base")
    keys = TABLE.buffers({"n_layers": n_layers, "tied_copy": False})
    default = float(base or SCRIPT_CONFIG["rotary_embedding_base"])
    theta = layout.shared_rope_theta(tensors, keys, hd, path,
                                     theta_of=lambda buf, hd, key, file: _rope_theta(buf, hd, key, file, default))
    if base is not None and float(base) != theta:
      raise ConversionError(f"{cfg_path}: rotary_embedding_base={base!r} but the inv_freq buffers say {theta:g}")
    return (v, d, n_layers, hd, f), theta

  @staticmethod
  def _model_dict(values, v, d, n_layers, n_heads, f, theta) -> Dict[str, Any]:
    """The original's behaviour: constant ponder count, global exit over every position, one dropout rate."""
    try:
      dropout = float(values["dropout"])
      return {"arch": "hrm_text1", "family": "hrm_text1", "vocab_size": v, "d_model": d, "n_heads": n_heads,
              "n_layers": n_layers, "d_ff": f, "max_seq_len": int(values["block_size"]), "rope_theta": theta,
              "norm_eps": 1e-6, "halt_max_steps": int(values["halt_max_steps"]),
              "halt_bias_init": float(values["halt_bias_init"]), "halt_eps": 1e-6,
              "ponder_loss_weight": float(values["ponder_loss_weight"]), "ponder_loss": "count",
              "exit_over_padding": True, "dropout": dropout, "attention_dropout": dropout, "mlp_dropout": dropout,
              "embed_init_std": 1.0, "init_std": 0.0, "dtype": "float32",
              "remat": bool(values["gradient_checkpointing"])}
    except (TypeError, ValueError) as e:
      raise ConversionError(f"config.json: bad HRMText1Config value ({e})") from None

  @staticmethod
  def _tokenizer(v: int) -> Dict[str, Any]:
    """T5 sentencepiece (the shipped spiece.model) with v - 32000 extra ids; other vocabularies pass ids through."""
    if v >= T5_PIECES:
      return {"kind": "sentencepiece", "model_file": None, "extra_ids": v - T5_PIECES}  # None: the shipped model
    return {"kind": "ids", "vocab_size": v,
            "note": "the original uses the T5 tokenizer (32100 ids); this vocabulary is smaller, ids pass through"}

  # ---------------------------------------------------------------------------------- jaxlm -> torch
  def check(self, model, params):
    fam.require(model, {"arch": "hrm_text1"}, self.title)

  def write(self, model, params, source, tokenizer, out, options):
    """Writes config.json, generation_config.json and both weight formats (pytorch_model.bin, the README's, and
    model.safetensors, recent transformers' default; from_pretrained reads the latter when both exist).
    options.hrm_text1_weights ('bin' | 'safetensors', api keyword) writes only that one."""
    for key, (original, what) in TRAINING_FLAGS.items():
      if model.get(key) != original:
        print(f"note: model.{key} = {model.get(key)!r}: {what}", file=sys.stderr)
    rates = {model["dropout"], model["attention_dropout"], model["mlp_dropout"]}
    if len(rates) > 1:
      print(f"warning: HRMText1Config has one dropout rate; writing dropout={model['dropout']} (the model has "
            f"attention_dropout={model['attention_dropout']}, mlp_dropout={model['mlp_dropout']})", file=sys.stderr)
    formats = self._formats(getattr(options, "hrm_text1_weights", None))
    sizes = {"n_layers": model["n_layers"], "tied_copy": True,
             "inv_freq": layout.torch_rope_inv_freq(model["d_model"] // model["n_heads"], float(model["rope_theta"]))}
    items = [(k, np.array(v, order="C")) for k, v in TABLE.write(params, sizes, stacked=True)]  # owned, writable
    items = layout.to_dtypes(items, source.get("dtypes"))
    os.makedirs(out, exist_ok=True)
    _write_text(os.path.join(out, "config.json"), _json_text(self._hf_config(model, source, items)))
    gen = source.get("generation_config") or {"_from_model_config": True,
                                              "transformers_version": TRANSFORMERS_VERSION}
    _write_text(os.path.join(out, "generation_config.json"), _json_text(gen))
    if "bin" in formats:
      self._write_bin(items, os.path.join(out, BIN))
    if "safetensors" in formats:
      self._write_safetensors(items, os.path.join(out, SAFETENSORS))

  @staticmethod
  def _formats(choice: Optional[str]) -> Tuple[str, ...]:
    if choice is None:
      return tuple(FORMATS)
    if choice not in FORMATS:
      raise ConversionError(f"hrm_text1_weights must be one of {sorted(FORMATS)}, got {choice!r}")
    return (choice,)

  @staticmethod
  def _hf_config(model, source, items) -> Dict[str, Any]:
    """config.json as save_pretrained writes it: the imported one updated with this model's values."""
    cfg = dict(source.get("hf_config") or {})
    dtype = dict(items)["token_embeddings.weight"].dtype.name
    cfg.setdefault("architectures", ["HRMText1"])
    cfg.setdefault("model_type", "hrm_text1")
    cfg.setdefault("transformers_version", TRANSFORMERS_VERSION)
    cfg.setdefault("use_flash_attention", SCRIPT_CONFIG["use_flash_attention"])
    cfg.update({"vocab_size": model["vocab_size"], "block_size": model["max_seq_len"], "n_embd": model["d_model"],
                "n_head": model["n_heads"], "n_layers": model["n_layers"], "d_ff": model["d_ff"],
                "dropout": _number(model["dropout"]), "halt_max_steps": model["halt_max_steps"],
                "ponder_loss_weight": _number(model["ponder_loss_weight"]),
                "halt_bias_init": _number(model["halt_bias_init"]), "use_rotary_embeddings": True,
                "rotary_embedding_base": _number(model["rope_theta"]),
                "gradient_checkpointing": bool(model["remat"]),
                "torch_dtype": "float32" if dtype == "float32" else dtype})
    return cfg

  @staticmethod
  def _write_bin(items, path: str) -> None:
    """torch.save of a plain dict, as save_pretrained writes it: lm_head.weight is a second tensor on
    token_embeddings.weight's storage (state_dict() detaches each tied parameter), so the table is stored once."""
    state, ties = {}, TABLE.ties({"n_layers": 0, "tied_copy": True})
    for key, value in items:
      state[key] = state[ties[key]].detach() if key in ties else torchfile._to_torch(value)
    torchfile.save(state, path)

  @staticmethod
  def _write_safetensors(items, path: str) -> None:
    """safetensors cannot alias tensors: lm_head.weight is written as a copy (from_pretrained and a strict
    load_state_dict both accept it)."""
    tensors, ties = collections.OrderedDict(), TABLE.ties({"n_layers": 0, "tied_copy": True})
    for key, value in items:
      tensors[key] = tensors[ties[key]].copy() if key in ties else value
    safetensors_file.save(tensors, path, metadata={"format": "pt"})


fam.register(HRMText1Family())
