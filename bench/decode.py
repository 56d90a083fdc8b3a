#!/usr/bin/env python
"""Decode throughput: jaxlm with a KV cache, jaxlm by full recompute, and transformers' `generate` as the peer.

    python bench/decode.py                         # tiny and small, batch 1 and 8 (a few minutes on 2 cores)
    python bench/decode.py --sizes tiny --batches 1 --new-tokens 32     # quick look
    python bench/decode.py --json runs/decode_bench.json

Models are Optimus-Prime-shaped (RMSNorm eps = float32 eps, GQA, interleaved RoPE, SwiGLU with MLP biases,
untied head) with random weights. The peer is the same weights exported by `convert jax2torch --family llama`
and loaded into transformers' LlamaForCausalLM, measured in the same run on the same threads: greedy decoding,
KV cache on (`use_cache=True`), no stop token, float32, `torch.inference_mode`. Prompts are random ids of one
length (no padding on either side). Every configuration runs once untimed (jaxlm compiles then), then the
best of `--repeats` timed runs counts. tokens/s = batch * new tokens / seconds, prefill included.
The greedy tokens of the three are compared; they agree unless two logits are within float noise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

EPS_F32 = float(np.finfo(np.float32).eps)
SIZES = {
    # the shared Optimus Prime fixture's shape
    "tiny": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256),
    # a small GPT-2-vocabulary model with the original's 8 query / 2 kv heads
    "small": dict(vocab_size=50257, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=1024),
}


def model_dict(size: str) -> dict:
  return dict(arch="decoder", family="optimus_prime", **SIZES[size], norm="rms", norm_eps=EPS_F32,
              rope_style="interleaved", rope_theta=1e4, glu="silu", attn_bias=False, mlp_bias=True,
              head_bias=False, tie_embeddings=False, causal=True, max_seq_len=1024)


def make_model_dir(size: str, path: str, seed: int) -> str:
  from flax import traverse_util
  from jaxlm import modeldir
  model = model_dict(size)
  rng = np.random.default_rng(seed)
  params = {}
  for key, shape in modeldir.expected_param_shapes(model).items():
    if key.endswith("scale"):
      params[key] = np.ones(shape, np.float32)
    else:
      fan_in = shape[0] if key.endswith("kernel") else 1
      params[key] = (rng.standard_normal(shape) / np.sqrt(fan_in if key.endswith("kernel") else 50)).astype(np.float32)
  return modeldir.save_model_dir(path, model, traverse_util.unflatten_dict(params, sep="/"))


def best_time(fn, repeats: int):
  fn()  # warm-up (jaxlm compiles here)
  times, result = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return min(times), result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="tiny,small")
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
  parser.add_argument("--skip-recompute", action="store_true")
  parser.add_argument("--json", help="write the results here")
  args = parser.parse_args(argv)

  import jax
  import torch
  import transformers
  from convert import api
  from jaxlm import generate
  from jaxlm.sampling import Sampling

  if args.threads:
    torch.set_num_threads(args.threads)
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"{os.cpu_count()} cpus, {platform.processor() or platform.machine()}")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for size in args.sizes.split(","):
      jax_dir = make_model_dir(size, os.path.join(tmp, size), seed=0)
      hf_dir = api.jax2torch(jax_dir, os.path.join(tmp, size + "_hf"), family="llama")
      hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
      model = generate.load(jax_dir)
      n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))
      print(f"\n{size}: {n_params:,} parameters, {SIZES[size]}")
      for batch in (int(b) for b in args.batches.split(",")):
        prompts = np.random.default_rng(batch).integers(0, SIZES[size]["vocab_size"], (batch, args.prompt_len))
        results = {}
        strategies = ["cache"] + ([] if args.skip_recompute else ["recompute"])
        for strategy in strategies:
          gen = generate.Generator(model.module, model.params, strategy=strategy)
          seconds, out = best_time(lambda: gen.generate(prompts, args.new_tokens, sampling=Sampling()),
                                   args.repeats)
          results[strategy] = (seconds, np.array(out.tokens))

        def run_hf():
          with torch.inference_mode():
            return hf.generate(torch.tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                               use_cache=True, eos_token_id=None, pad_token_id=0)
        seconds, out = best_time(run_hf, args.repeats)
        results["transformers"] = (seconds, out[:, args.prompt_len:].numpy())

        reference = results["transformers"][1]
        peer_tps = batch * args.new_tokens / results["transformers"][0]
        for name, (seconds, tokens) in results.items():
          tps = batch * args.new_tokens / seconds
          agree = float(np.mean(tokens == reference))
          row = dict(size=size, batch=batch, impl=name, seconds=round(seconds, 4), tokens_per_sec=round(tps, 1),
                     ratio_vs_transformers=round(tps / peer_tps, 2), tokens_equal_to_peer=round(agree, 3))
          rows.append(row)
          print(f"  batch {batch:2d}  {name:12s} {tps:9.1f} tokens/s  ({seconds:.3f} s)  "
                f"x{tps / peer_tps:5.2f} vs transformers  greedy tokens equal to peer: {agree:.0%}")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump({"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rows": rows}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
