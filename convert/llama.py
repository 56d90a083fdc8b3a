"""Hugging Face Llama: a folder with config.json (model_type "llama") and model.safetensors (or shards with
model.safetensors.index.json, or pytorch_model.bin read by the restricted unpickler).

Any jaxlm decoder with RMSNorm, a gated MLP whose activation transformers knows, no head bias, causal full
attention is expressible: GQA (num_key_value_heads), explicit head_dim, q/k/v/o biases (attention_bias), MLP
biases (mlp_bias) and tied embeddings included. HF applies rotate-half RoPE to the projection outputs; a model
with interleaved RoPE (Optimus Prime, Meta's original Llama) is exported by permuting the head_dim axis of its
q and k projections so pair (2i, 2i+1) lands on (i, i + head_dim/2): the attention scores are unchanged.
Imports are always rotate-half (no permutation needed).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, Mapping

import numpy as np

from convert import family as fam
from convert import layout, safetensors_file, torchfile
from convert.errors import ConversionError
from convert.table import (COPY, LINEAR, Layers, Row, Table, decoder_sizes, dense, heads_bias, heads_in, heads_out,
                           norm, permuted)

# jaxlm glu activation <-> transformers ACT2FN name
GLU_TO_HF = {"silu": "silu", "sigmoid": "sigmoid", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
HF_TO_GLU = {**{v: k for k, v in GLU_TO_HF.items()}, "swish": "silu", "gelu_new": "gelu_tanh"}
FIXED = {"arch": "decoder", "norm": "rms", "head_bias": False}
# LlamaForCausalLM attends causally over the whole context (no sliding window). Interleaved RoPE is not listed: the
# export permutes q and k so that rotate-half computes the same scores.
ORIGINAL_COMPUTATION = {"causal": True, "attention_window": 0}
WEIGHTS_FILE = "model.safetensors"
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers older transformers saved; recomputed from rope_theta


def _folder(src: str) -> str:
  return src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))


def _hf_config(src: str) -> Dict[str, Any]:
  path = os.path.join(_folder(src), "config.json")
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: missing; a Hugging Face Llama checkpoint needs its config.json")
  return fam.read_json(path, "the Hugging Face config")


def _tensors(src: str) -> Dict[str, np.ndarray]:
  if os.path.isfile(src):
    return torchfile.load(src) if src.endswith(".bin") else safetensors_file.load(src)
  folder = src
  if os.path.isfile(os.path.join(folder, WEIGHTS_FILE)):
    return safetensors_file.load(os.path.join(folder, WEIGHTS_FILE))
  index = os.path.join(folder, WEIGHTS_FILE + ".index.json")
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    out: Dict[str, np.ndarray] = {}
    for shard in shards:
      out.update(safetensors_file.load(os.path.join(folder, shard)))
    return out
  if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
    return torchfile.load(os.path.join(folder, "pytorch_model.bin"))
  raise ConversionError(f"{folder}: no {WEIGHTS_FILE}, sharded index or pytorch_model.bin")


def _rope_theta(cfg: Mapping[str, Any], where: str) -> float:
  rope = cfg.get("rope_parameters") or {}
  scaling = cfg.get("rope_scaling") or {}
  kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if kind != "default":
    raise ConversionError(f"{where}: rope type {kind!r} (RoPE scaling) is not supported by jaxlm")
  return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _special(value):
  return value[0] if isinstance(value, list) and value else value


# One description of the tensors (LlamaForCausalLM parameter order) for read, write and the shape check. HF rotates
# halves: a model with interleaved RoPE is written with q and k's head_dim reordered (sizes "rope_perm").
Q, K = permuted(heads_in("n"), "rope_perm"), permuted(heads_in("k"), "rope_perm")
Q_BIAS, K_BIAS = permuted(heads_bias("n"), "rope_perm"), permuted(heads_bias("k"), "rope_perm")
TABLE = Table([
    Row("model.embed_tokens.weight", "embed/embedding", COPY, "v,d"),
    Layers("model.layers.{i}.", (
        *dense("self_attn.q_proj", "attn/query", Q, Q_BIAS, "n*hd,d", "attn_bias"),
        *dense("self_attn.k_proj", "attn/key", K, K_BIAS, "k*hd,d", "attn_bias"),
        *dense("self_attn.v_proj", "attn/value", heads_in("k"), heads_bias("k"), "k*hd,d", "attn_bias"),
        *dense("self_attn.o_proj", "attn/out", heads_out("n"), COPY, "d,n*hd", "attn_bias"),
        *dense("mlp.gate_proj", "mlp/wi", LINEAR, COPY, "f,d", "mlp_bias", slot=1),
        *dense("mlp.up_proj", "mlp/wi", LINEAR, COPY, "f,d", "mlp_bias", slot=0),
        *dense("mlp.down_proj", "mlp/wo", LINEAR, COPY, "d,f", "mlp_bias"),
        *norm("input_layernorm", "attn_norm"),
        *norm("post_attention_layernorm", "mlp_norm"))),
    *norm("model.norm", "final_norm"),
    Row("lm_head.weight", "head/kernel", LINEAR, "v,d", when="untied")])


class Llama(fam.Family):
  name = "llama"
  title = "Hugging Face Llama"
  original_computation = ORIGINAL_COMPUTATION
  summary = "Hugging Face Llama folder (config.json + model.safetensors), import and export"
  writes_directory = True

  def sniff(self, src, obj):
    if not os.path.isfile(os.path.join(_folder(src), "config.json")):
      return False
    try:
      return _hf_config(src).get("model_type") == "llama"
    except ConversionError:
      return False

  def read(self, src, obj, options):
    cfg = _hf_config(src)
    where = os.path.join(_folder(src), "config.json")
    if cfg.get("model_type") != "llama":
      raise ConversionError(f"{where}: model_type is {cfg.get('model_type')!r}, expected 'llama'")
    act = cfg.get("hidden_act", "silu")
    if act not in HF_TO_GLU:
      raise ConversionError(f"{where}: hidden_act {act!r} has no jaxlm equivalent ({sorted(HF_TO_GLU)})")
    try:
      d, n = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
      model = {"arch": "decoder", "vocab_size": int(cfg["vocab_size"]), "d_model": d,
               "n_layers": int(cfg["num_hidden_layers"]), "n_heads": n,
               "n_kv_heads": int(cfg.get("num_key_value_heads") or n),
               "head_dim": int(cfg.get("head_dim") or d // n), "d_ff": int(cfg["intermediate_size"]),
               "norm": "rms", "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)), "rope_style": "half",
               "rope_theta": _rope_theta(cfg, where), "glu": HF_TO_GLU[act],
               "attn_bias": bool(cfg.get("attention_bias", False)), "mlp_bias": bool(cfg.get("mlp_bias", False)),
               "head_bias": False, "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)), "causal": True,
               "attention_window": 0, "dropout": 0.0,
               "attention_dropout": float(cfg.get("attention_dropout", 0.0)),
               "embed_init_std": float(cfg.get("initializer_range", 0.02)),
               "init_std": float(cfg.get("initializer_range", 0.02)),
               "max_seq_len": int(cfg.get("max_position_embeddings", 2048))}
    except KeyError as e:
      raise ConversionError(f"{where}: missing field {e.args[0]!r}") from None
    tensors = dict(obj) if isinstance(obj, Mapping) else _tensors(src)  # obj: an unpickled pytorch_model.bin
    if model["tie_embeddings"]:
      tensors.pop("lm_head.weight", None)  # some writers store the tied copy as well
    tensors = {k: t for k, t in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}
    sizes = decoder_sizes(model)
    state = layout.check_state_dict(tensors, TABLE.schema(sizes), _folder(src))
    params = TABLE.read(state, sizes, _folder(src))
    tokenizer = {"kind": "ids", "vocab_size": model["vocab_size"], "bos_id": _special(cfg.get("bos_token_id")),
                 "eos_id": _special(cfg.get("eos_token_id")), "pad_id": _special(cfg.get("pad_token_id")),
                 "note": "the Hugging Face tokenizer files are not converted; token ids pass through"}
    source = {"family": self.name, "file": os.path.abspath(src), "dtypes": layout.source_dtypes(state),
              "hf_config": cfg}
    return fam.Imported(model, params, tokenizer, source)

  def check(self, model, params):
    fam.require(model, FIXED, self.title)
    if model["glu"] not in GLU_TO_HF:
      raise ConversionError(f"model.glu {model['glu']!r} has no transformers activation")
    fam.window_of(model)

  def write(self, model, params, source, tokenizer, out, options):
    perm = layout.interleaved_to_half(model["head_dim"]) if model["rope_style"] == "interleaved" else None
    tensors = dict(TABLE.write(params, decoder_sizes(model, rope_perm=perm)))
    os.makedirs(out, exist_ok=True)
    safetensors_file.save({k: np.asarray(v, np.float32) for k, v in tensors.items()},
                          os.path.join(out, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
      json.dump(self._hf_config(model, tokenizer), f, indent=2)
    if model["rope_style"] == "interleaved":
      print("note: interleaved RoPE exported as rotate-half by permuting q/k head_dim rows", file=sys.stderr)

  def _hf_config(self, model, tokenizer) -> Dict[str, Any]:
    specials = {"bos_id": 50256, "eos_id": 50256} if tokenizer.get("kind") == "gpt2" else tokenizer  # <|endoftext|>
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": model["vocab_size"],
        "hidden_size": model["d_model"], "intermediate_size": model["d_ff"],
        "num_hidden_layers": model["n_layers"], "num_attention_heads": model["n_heads"],
        "num_key_value_heads": model["n_kv_heads"], "head_dim": model["head_dim"],
        "hidden_act": GLU_TO_HF[model["glu"]], "max_position_embeddings": model["max_seq_len"],
        "rms_norm_eps": model["norm_eps"], "rope_theta": model["rope_theta"],
        "rope_parameters": {"rope_type": "default", "rope_theta": model["rope_theta"]},
        "attention_bias": model["attn_bias"], "mlp_bias": model["mlp_bias"],
        "attention_dropout": model["attention_dropout"], "tie_word_embeddings": model["tie_embeddings"],
        "initializer_range": model["init_std"], "bos_token_id": specials.get("bos_id"),
        "eos_token_id": specials.get("eos_id"), "pad_token_id": specials.get("pad_id"),
        "torch_dtype": "float32", "use_cache": True}


fam.register(Llama())
