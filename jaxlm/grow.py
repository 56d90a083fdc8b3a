"""Depth growth that keeps the function: `python -m jaxlm.grow --src DIR --out DIR2 --add-layers K` (decoder
families) or `--add-l-layers K --add-h-layers K` (HRM).

New blocks go after the existing ones of their stack. Each is a copy of the stack's last block with its output
projections (attention `out`, MLP `wo`, kernels and biases) zeroed: in a pre-norm residual block x + f(norm(x))
that makes it the identity, so the grown model's logits equal the source's, while its other weights are
trained-scale and its zeroed projections get gradients from the first step. Post-norm stacks (the original
HRM's norm(x + f(x))) have no such identity and are refused. HRM-Text1 pairs are not grown: every pair adds its
halting-weighted state to the output sum, so no new pair leaves the logits unchanged.

SRC is a model directory or a workdir (--which latest|best); OUT is a model directory whose history (see
jaxlm.lineage) records the growth.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Any, Dict, Mapping, Tuple

import numpy as np
from flax import traverse_util

from jaxlm import lineage, modeldir

ZEROED = ("attn/out/kernel", "attn/out/bias", "mlp/wo/kernel", "mlp/wo/bias")


def identity_block(block: Mapping[str, Any]) -> Dict[str, Any]:
  """A copy of `block` (one block's params) whose output projections are zero."""
  flat = {k: np.array(v, copy=True) for k, v in traverse_util.flatten_dict(dict(block), sep="/").items()}
  for key in ZEROED:
    if key in flat:
      flat[key] = np.zeros_like(flat[key])
  return traverse_util.unflatten_dict(flat, sep="/")


def _append_blocks(stack: Mapping[str, Any], n_old: int, k: int) -> Dict[str, Any]:
  stack = dict(stack)
  for i in range(n_old, n_old + k):
    stack[f"layers_{i}"] = identity_block(stack[f"layers_{n_old - 1}"])
  return stack


def add_layers(model_dict: Mapping[str, Any], params: Mapping[str, Any], k: int) -> Tuple[Dict[str, Any], Dict]:
  """Decoder: K identity blocks after the last one (canonical layout: per-block, unpadded)."""
  if model_dict.get("arch", "decoder") != "decoder":
    raise ValueError(f"--add-layers grows decoder models; this one is {model_dict.get('arch')!r} "
                     "(HRM: --add-l-layers / --add-h-layers)")
  if model_dict.get("norm_position", "pre") != "pre":
    raise ValueError("only pre-norm blocks have an identity initialisation")
  n = int(model_dict["n_layers"])
  model = {**model_dict, "n_layers": n + k}
  window = model_dict.get("attention_window")
  if isinstance(window, (list, tuple)):  # per-layer windows: the new blocks see as far as the last one
    model["attention_window"] = list(window) + [window[-1]] * k
  return model, _append_blocks(params, n, k)


def add_hrm_layers(model_dict: Mapping[str, Any], params: Mapping[str, Any], add_l: int, add_h: int):
  """HRM: identity blocks at the end of the L and H modules (before their final norms)."""
  if model_dict.get("arch") != "hrm":
    raise ValueError(f"--add-l-layers / --add-h-layers grow HRM models; this one is {model_dict.get('arch')!r}")
  if model_dict.get("norm_position") != "pre":
    raise ValueError("this HRM model uses post-norm blocks (norm(x + f(x)), the original's): no added block "
                     "leaves them unchanged; grow a pre-norm model (configs/hrm.py default) instead")
  model, params = dict(model_dict), dict(params)
  for name, field, k in (("L_module", "l_layers", add_l), ("H_module", "h_layers", add_h)):
    if k:
      params[name] = _append_blocks(params[name], int(model[field]), k)
      model[field] = int(model[field]) + k
  return model, params


def n_params(params) -> int:
  return sum(int(np.prod(np.shape(v))) for v in traverse_util.flatten_dict(dict(params)).values())


def grow(src: str, out: str, *, add_layers_k: int = 0, add_l: int = 0, add_h: int = 0, which: str = "latest",
         overwrite: bool = False) -> str:
  """Writes the grown model directory `out` from `src`; returns its path."""
  if min(add_layers_k, add_l, add_h) < 0 or not (add_layers_k or add_l or add_h):
    raise ValueError("give a positive --add-layers, or --add-l-layers / --add-h-layers")
  loaded = modeldir.load(src, which)
  before = n_params(loaded.params)
  if add_layers_k:
    model, params = add_layers(loaded.model_dict, loaded.params, add_layers_k)
  else:
    model, params = add_hrm_layers(loaded.model_dict, loaded.params, add_l, add_h)
  tokenizer = None
  if loaded.tokenizer_dir and os.path.isfile(os.path.join(loaded.tokenizer_dir, modeldir.TOKENIZER_FILE)):
    with open(os.path.join(loaded.tokenizer_dir, modeldir.TOKENIZER_FILE), encoding="utf-8") as f:
      tokenizer = json.load(f)
  added = {"layers": add_layers_k} if add_layers_k else {"l_layers": add_l, "h_layers": add_h}
  event = {"kind": "layers", "added": added, "params_before": before, "params_after": n_params(params),
           "at": lineage.now(), "from": os.path.abspath(src)}
  source = copy.deepcopy(loaded.source)
  if not source.get("family") and model.get("family"):
    source["family"] = model["family"]
  return modeldir.save_model_dir(out, model, params, tokenizer, source, overwrite=overwrite,
                                 history=lineage.with_event(lineage.read(src), event))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxlm.grow", description=__doc__.split("\n\n")[0])
  parser.add_argument("--src", required=True, help="model directory or training workdir")
  parser.add_argument("--out", required=True, help="the grown model directory to write")
  parser.add_argument("--which", default="latest", choices=("latest", "best"), help="checkpoint of a workdir")
  parser.add_argument("--add-layers", type=int, default=0, help="decoder blocks to add")
  parser.add_argument("--add-l-layers", type=int, default=0, help="HRM L-module blocks to add")
  parser.add_argument("--add-h-layers", type=int, default=0, help="HRM H-module blocks to add")
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  try:
    path = grow(args.src, args.out, add_layers_k=args.add_layers, add_l=args.add_l_layers, add_h=args.add_h_layers,
                which=args.which, overwrite=args.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
