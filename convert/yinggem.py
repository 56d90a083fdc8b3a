"""YingGem-T1 (naidezhujimo/YingGem-T1, model.py): `yinggem_best.pth`, a plain state_dict.

Sizes come from tensor shapes (head_dim from the saved RoPE buffer `rope.freqs`, so the head count too); what
the file cannot say (attention_window, rms_norm_eps, attention_dropout, max_position_embeddings) comes from
--attention-window, else a config.json beside the file (YingGemConfig field names), else YingGemConfig's
defaults (window 1024, eps 1e-6, dropout 0.2).
Architecture: pre-RMSNorm, biased q/k/v/o, rotate-half RoPE, NO causal mask (query i sees keys j >= i - W + 1,
the future included), MLP proj -> a * sigmoid(g) -> Linear, untied head with bias.
"""
from __future__ import annotations

import math
import sys
from typing import Mapping

from convert import family as fam
from convert import layout, torchfile
from convert.errors import ConversionError
from convert.table import (COPY, LINEAR, Layers, Row, Table, buffer, chunked, decoder_sizes, dense, heads_bias,
                           heads_in, heads_out, norm)

# YingGemConfig defaults for what the checkpoint does not store.
DEFAULTS = {"attention_window": 1024, "rms_norm_eps": 1e-6, "attention_dropout": 0.2,
            "max_position_embeddings": 1024}
# Tensors the format fixes (export refuses anything else).
FIXED = {"arch": "decoder", "norm": "rms", "attn_bias": True, "mlp_bias": True, "head_bias": True,
         "tie_embeddings": False}
# What the original computes with them: attention without a causal mask (a position also sees every later token in
# its window), a*sigmoid(g) MLP, rotate-half RoPE. Not listed: the window and rms_norm_eps are YingGemConfig values
# the user passes when loading the file (write prints them), and the saved rope.freqs buffers carry rope_theta.
ORIGINAL_COMPUTATION = {"causal": False, "glu": "sigmoid", "rope_style": "half"}
BLOCK_MODULES = ("", ".attn_norm", ".attn", ".attn.q_proj", ".attn.k_proj", ".attn.v_proj", ".attn.o_proj",
                 ".attn.rope", ".attn.dropout", ".mlp_norm", ".mlp", ".mlp.0", ".mlp.0.proj", ".mlp.1")
# One description of the tensors for read, write and the shape check.
TABLE = Table([
    Row("embed.weight", "embed/embedding", COPY, "v,d"),
    Layers("block.{i}.", (
        *norm("attn_norm", "attn_norm"),
        *dense("attn.q_proj", "attn/query", heads_in("n"), heads_bias("n"), "d,d"),
        *dense("attn.k_proj", "attn/key", heads_in("n"), heads_bias("n"), "d,d"),
        *dense("attn.v_proj", "attn/value", heads_in("n"), heads_bias("n"), "d,d"),
        *dense("attn.o_proj", "attn/out", heads_out("n"), COPY, "d,d"),
        Row("attn.rope.freqs", None, buffer("inv_freq"), "hd/2"),
        *norm("mlp_norm", "mlp_norm"),
        *chunked("mlp.0.proj", [("mlp/wi", 0), ("mlp/wi", 1)], LINEAR, COPY, "f,d"),  # chunk(2): value, gate
        *dense("mlp.1", "mlp/wo", LINEAR, COPY, "d,f"))),
    *norm("norm", "final_norm"),
    *dense("lm_head", "head", LINEAR, COPY, "v,d")])


class YingGem(fam.Family):
  name = "yinggem"
  title = "YingGem"
  original_computation = ORIGINAL_COMPUTATION
  summary = "YingGem-T1 yinggem_best.pth (plain state_dict)"
  default_filename = "yinggem_best.pth"

  def add_arguments(self, parser):
    parser.add_argument("--attention-window", type=int, default=None,
                        help="yinggem: sliding window W (not stored in the checkpoint). Default: attention_window "
                             "of a config.json beside the checkpoint if present, else 1024 (YingGemConfig)")

  def sniff(self, src, obj):
    return isinstance(obj, Mapping) and "block.0.attn.q_proj.weight" in obj and "lm_head.weight" in obj

  def read(self, src, obj, options):
    if not self.sniff(src, obj):
      raise ConversionError(f"{src}: not a YingGem state_dict (expected keys 'block.0.attn.q_proj.weight' "
                            "and 'lm_head.weight')")
    for key in ("embed.weight", "block.0.attn.rope.freqs", "block.0.mlp.1.weight"):
      if key not in obj:
        raise ConversionError(f"{src}: missing tensor {key!r}")
    v, d = obj["embed.weight"].shape
    hd = 2 * obj["block.0.attn.rope.freqs"].shape[0]
    if not hd or d % hd:
      raise ConversionError(f"{src}: head_dim {hd} (from block.0.attn.rope.freqs) does not divide hidden {d}")
    n, f = d // hd, obj["block.0.mlp.1.weight"].shape[1]
    n_layers = layout.count_by_prefix(list(obj), "block.", ".attn_norm.weight")
    side = fam.read_sidecar(src) or {}
    for key, value in (("vocab_size", v), ("hidden_size", d), ("num_hidden_layers", n_layers),
                       ("num_attention_heads", n), ("intermediate_size", f)):
      if key in side and side[key] != value:
        raise ConversionError(f"{src}: config.json beside the checkpoint says {key}={side[key]!r} but the "
                              f"tensors say {value}")
    sizes = {"v": v, "d": d, "n": n, "hd": hd, "f": f, "n_layers": n_layers}
    state = layout.check_state_dict(obj, TABLE.schema(sizes), src)
    theta = layout.shared_rope_theta(state, TABLE.buffers(sizes), hd, src)
    params = TABLE.read(state, sizes, src)
    window = getattr(options, "attention_window", None) or side.get("attention_window", DEFAULTS["attention_window"])
    model = {"arch": "decoder", "family": self.name, "vocab_size": v, "d_model": d, "n_layers": n_layers, "n_heads": n,
             "n_kv_heads": n, "head_dim": hd, "d_ff": f, "norm": "rms",
             "norm_eps": float(side.get("rms_norm_eps", DEFAULTS["rms_norm_eps"])), "rope_style": "half",
             "rope_theta": theta, "glu": "sigmoid", "attn_bias": True, "mlp_bias": True, "head_bias": True,
             "tie_embeddings": False, "causal": False, "attention_window": int(window), "dropout": 0.0,
             "attention_dropout": float(side.get("attention_dropout", DEFAULTS["attention_dropout"])),
             "embed_init_std": 0.02, "init_std": 0.02 / math.sqrt(2 * n_layers),
             "max_seq_len": int(side.get("max_position_embeddings", DEFAULTS["max_position_embeddings"]))}
    notes = [f"attention_window={window} from " + ("--attention-window" if getattr(options, "attention_window", None)
                                                    else "config.json beside the checkpoint"
                                                    if "attention_window" in side else "the YingGemConfig default")]
    source = {"family": self.name, "file": src, "dtypes": layout.source_dtypes(state), "notes": notes}
    tokenizer = {"kind": "gpt2", "assets_dir": None} if v == 50257 else {
        "kind": "ids", "vocab_size": v, "note": "the original uses GPT-2 BPE; this vocabulary is not GPT-2's"}
    return fam.Imported(model, params, tokenizer, source)

  def check(self, model, params):
    n = model["n_heads"]
    fam.require(model, {**FIXED, "n_kv_heads": n, "head_dim": model["d_model"] // n}, self.title)
    fam.window_of(model)

  def write(self, model, params, source, tokenizer, out, options):
    window = fam.window_of(model)
    settings = {"attention_window": window, "rms_norm_eps": model["norm_eps"],
                "attention_dropout": model["attention_dropout"]}
    differ = {k: v for k, v in settings.items() if v != DEFAULTS[k]}
    if window == 0:
      print("warning: the model has no attention window; the original always applies one (set "
            "YingGemConfig.attention_window >= the longest sequence)", file=sys.stderr)
    elif differ:
      print(f"note: the checkpoint does not store {', '.join(f'{k}={v!r}' for k, v in differ.items())}; set them "
            "on YingGemConfig when loading it with the original code", file=sys.stderr)
    sizes = decoder_sizes(model)
    sizes["inv_freq"] = layout.torch_rope_inv_freq(sizes["hd"], float(model["rope_theta"]))
    items = layout.to_dtypes(TABLE.write(params, sizes), source.get("dtypes"))
    modules = ["", "embed", "block"] + [f"block.{i}{m}" for i in range(model["n_layers"]) for m in BLOCK_MODULES]
    torchfile.save(torchfile.state_dict(items, modules + ["norm", "lm_head"]), out)


fam.register(YingGem())
