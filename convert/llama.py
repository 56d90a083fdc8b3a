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


def schema(m: Mapping[str, Any]) -> Dict[str, tuple]:
  """HF key -> shape for a jaxlm model dict (all fields resolved), in LlamaForCausalLM parameter order."""
  v, d, f, n, k, hd = m["vocab_size"], m["d_model"], m["d_ff"], m["n_heads"], m["n_kv_heads"], m["head_dim"]
  s = {"model.embed_tokens.weight": (v, d)}
  for i in range(m["n_layers"]):
    p = f"model.layers.{i}."
    for name, rows in (("q_proj", n * hd), ("k_proj", k * hd), ("v_proj", k * hd)):
      s[p + f"self_attn.{name}.weight"] = (rows, d)
      if m["attn_bias"]:
        s[p + f"self_attn.{name}.bias"] = (rows,)
    s[p + "self_attn.o_proj.weight"] = (d, n * hd)
    if m["attn_bias"]:
      s[p + "self_attn.o_proj.bias"] = (d,)
    for name, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
      s[p + f"mlp.{name}.weight"] = shape
      if m["mlp_bias"]:
        s[p + f"mlp.{name}.bias"] = shape[:1]
    s[p + "input_layernorm.weight"] = (d,)
    s[p + "post_attention_layernorm.weight"] = (d,)
  s["model.norm.weight"] = (d,)
  if not m["tie_embeddings"]:
    s["lm_head.weight"] = (v, d)
  return s


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
    state = layout.check_state_dict(tensors, schema(model), _folder(src))
    n, k = model["n_heads"], model["n_kv_heads"]
    params = {"embed/embedding": state["model.embed_tokens.weight"], "final_norm/scale": state["model.norm.weight"]}
    if not model["tie_embeddings"]:
      params["head/kernel"] = layout.linear(state["lm_head.weight"])
    for i in range(model["n_layers"]):
      p, j = f"model.layers.{i}.", f"layers_{i}/"
      for name, jax_name, heads in (("q_proj", "query", n), ("k_proj", "key", k), ("v_proj", "value", k)):
        params[j + f"attn/{jax_name}/kernel"] = layout.heads_in(state[p + f"self_attn.{name}.weight"], heads)
        if model["attn_bias"]:
          params[j + f"attn/{jax_name}/bias"] = layout.heads_bias(state[p + f"self_attn.{name}.bias"], heads)
      params[j + "attn/out/kernel"] = layout.heads_out(state[p + "self_attn.o_proj.weight"], n)
      params[j + "mlp/wi/kernel"] = layout.glu_in(state[p + "mlp.up_proj.weight"], state[p + "mlp.gate_proj.weight"])
      params[j + "mlp/wo/kernel"] = layout.linear(state[p + "mlp.down_proj.weight"])
      if model["attn_bias"]:
        params[j + "attn/out/bias"] = state[p + "self_attn.o_proj.bias"]
      if model["mlp_bias"]:
        params[j + "mlp/wi/bias"] = layout.glu_bias(state[p + "mlp.up_proj.bias"], state[p + "mlp.gate_proj.bias"])
        params[j + "mlp/wo/bias"] = state[p + "mlp.down_proj.bias"]
      params[j + "attn_norm/scale"] = state[p + "input_layernorm.weight"]
      params[j + "mlp_norm/scale"] = state[p + "post_attention_layernorm.weight"]
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
    hd = model["head_dim"]
    # HF rotates halves: reorder interleaved pairs (2i, 2i+1) to (i, i + hd/2) in q and k.
    perm = layout.interleaved_to_half(hd) if model["rope_style"] == "interleaved" else np.arange(hd)
    tensors = {"model.embed_tokens.weight": params["embed/embedding"]}
    for i in range(model["n_layers"]):
      p, j = f"model.layers.{i}.", f"layers_{i}/"
      for name, jax_name, order in (("q_proj", "query", perm), ("k_proj", "key", perm),
                                    ("v_proj", "value", np.arange(hd))):
        tensors[p + f"self_attn.{name}.weight"] = layout.unheads_in(params[j + f"attn/{jax_name}/kernel"][..., order])
        if model["attn_bias"]:
          tensors[p + f"self_attn.{name}.bias"] = layout.unheads_bias(params[j + f"attn/{jax_name}/bias"][..., order])
      tensors[p + "self_attn.o_proj.weight"] = layout.unheads_out(params[j + "attn/out/kernel"])
      if model["attn_bias"]:
        tensors[p + "self_attn.o_proj.bias"] = params[j + "attn/out/bias"]
      up, gate = layout.unglu(params[j + "mlp/wi/kernel"])
      tensors.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                      p + "mlp.down_proj.weight": layout.unlinear(params[j + "mlp/wo/kernel"])})
      if model["mlp_bias"]:
        up_b, gate_b = layout.unglu_bias(params[j + "mlp/wi/bias"])
        tensors.update({p + "mlp.gate_proj.bias": gate_b, p + "mlp.up_proj.bias": up_b,
                        p + "mlp.down_proj.bias": params[j + "mlp/wo/bias"]})
      tensors[p + "input_layernorm.weight"] = params[j + "attn_norm/scale"]
      tensors[p + "post_attention_layernorm.weight"] = params[j + "mlp_norm/scale"]
    tensors["model.norm.weight"] = params["final_norm/scale"]
    if not model["tie_embeddings"]:
      tensors["lm_head.weight"] = layout.unlinear(params["head/kernel"])
    expected = schema(model)
    wrong = [k for k in expected if k not in tensors or tensors[k].shape != expected[k]]
    if wrong or len(tensors) != len(expected):
      raise ConversionError(f"internal layout error at {wrong[:1] or sorted(set(tensors) - set(expected))[:1]}")
    tensors = {k: tensors[k] for k in expected}  # LlamaForCausalLM parameter order
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
