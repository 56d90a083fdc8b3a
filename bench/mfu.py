"""Tokens/s per device and MFU of every full-size config on whatever backend JAX finds, beside a PyTorch peer.

  python bench/mfu.py                                    # every config, 10 steps, default batch
  python bench/mfu.py --configs optimus_prime,yinggem --batch 32 --steps 20 --dtype bfloat16

MFU = model FLOPs per token (jaxlm/flops.py, counted as MaxText does: 6 x matmul weights per token plus attention,
no rematerialisation) x tokens/s / device peak (bf16 dense, jaxlm/flops.py's table; on a CPU there is no peak and
only TFLOP/s are printed). Each run is its own process (bench/memory.py's workers: random token ids, the config's
optimizer, the jitted train step on one device). The peer: Hugging Face LlamaForCausalLM of Optimus Prime's size
(`--torch-peer llama`, the default for optimus_prime) or the test suite's torch re-implementation of the family,
on the same device, in the same dtype (autocast), with torch.compile on a GPU.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memory  # noqa: E402  (bench/memory.py: the worker processes)


def _peak(device_kind: str):
  sys.path.insert(0, memory.ROOT)
  from jaxlm import flops
  return flops.peak_tflops(device_kind or "")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default=",".join(memory.CONFIGS))
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
  parser.add_argument("--dtype", default="", help="model.dtype for jaxlm and autocast dtype for torch "
                                                  "(default: bfloat16 on an accelerator, float32 on CPU)")
  parser.add_argument("--set", action="append", default=[], help="more section.field=value for the jaxlm runs")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--timeout", type=float, default=1800)
  args = parser.parse_args(argv)

  import jax
  accelerator = jax.default_backend() != "cpu"
  dtype = args.dtype or ("bfloat16" if accelerator else "float32")
  torch_device = "cuda" if jax.default_backend() == "gpu" else "cpu"
  overrides = [f"model.dtype={dtype}"] + ([f"train.batch_size={args.batch}"] if args.batch else []) + args.set
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), dtype {dtype}, {args.steps} steps")
  print(f"{'config':14s} {'impl':8s} {'batch x len':12s} {'s/step':>8s} {'tok/s/device':>13s} {'TFLOP/s':>8s} "
        f"{'MFU':>6s} {'vs torch':>9s}")
  for name in args.configs.split(","):
    ours = memory.measure("jax", name, args.steps, overrides, args.timeout)
    rows = [("jaxlm", ours)]
    if not args.no_torch:
      peer = "llama" if name == "optimus_prime" else "reference"
      torch_args = ["--torch-peer", peer, "--torch-device", torch_device, "--torch-dtype", dtype]
      if torch_device == "cuda":
        torch_args.append("--torch-compile")
      rows.append(("torch" if peer == "reference" else "hf-llama", memory.measure("torch", name, args.steps,
                                                      [o for o in overrides if o.startswith("train.")],
                                                      args.timeout, torch_args)))
    for kind, r in rows:
      if r.get("missing") or "error" in r:
        print(f"{name:14s} {kind:8s} {r.get('error', 'no torch peer')}")
        continue
      tokens = r["batch"] * r["length"] / r["s_per_step"]
      tflops = (ours.get("flops_per_token") or 0) * tokens / 1e12  # the same model work for both
      peak = _peak(ours.get("device_kind", "")) if accelerator else None
      ratio = ""
      if kind == "jaxlm" and len(rows) > 1 and "s_per_step" in rows[1][1]:
        ratio = f"{rows[1][1]['s_per_step'] / r['s_per_step']:8.2f}x"
      print(f"{name:14s} {kind:8s} {r['batch']:4d} x {r['length']:<5d} {r['s_per_step']:8.3f} {tokens:13,.0f} "
            f"{tflops:8.2f} {(f'{tflops / peak:6.1%}' if peak else '     -')} {ratio:>9s}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
