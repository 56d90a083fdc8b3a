"""Training memory and speed of every full-size config, with a PyTorch implementation of the same model beside it.

  python bench/memory.py                                   # every config, 3 steps each, jaxlm then torch
  python bench/memory.py --configs yinggem,optimus_prime --steps 2
  python bench/memory.py --configs yinggem --set model.attention_impl=xla --set model.xent_chunk=1000000
                                                           # what the dense attention and whole logits cost

Each measurement runs in its own process (so peak RSS is that model's alone): the config's own model, optimizer,
batch size and sequence length, a train step jitted as jaxlm.train does (donated state, gradient accumulation)
on random token ids. Peak RSS is the process's high-water mark (ru_maxrss) including the runtime; seconds per step
are the mean of the steps after the first (which compiles). The PyTorch peers are the independent torch
re-implementations the test suite checks the converters against (tests/test_convert_families.py,
tests/test_convert_hrm_text1.py), trained with AdamW at the same batch, float32, eager, with the same
rematerialisation setting (torch.utils.checkpoint per block when the config remats). HRM has no torch peer here
(the suite's torch HRM is the original's inference loop, not its segment-wise ACT training).
A run that exhausts memory is reported as OOM, not as a crash.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("yinggem", "optimus_prime", "hrom", "hrm_text1", "hrm")
CHAR_VOCAB = 128  # configs whose vocabulary comes from a character tokenizer


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def _config(name: str, overrides):
  sys.path.insert(0, ROOT)
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("")
  for item in overrides:
    key, value = item.split("=", 1)
    section, field = key.split(".", 1)
    old = config[section][field]
    config[section][field] = type(old)(json.loads(value)) if not isinstance(old, str) else value
  if not config.model.get("vocab_size"):
    config.model.vocab_size = CHAR_VOCAB
  return config


# ------------------------------------------------------------------------------------------------ jax
def jax_worker(name: str, steps: int, overrides) -> dict:
  import functools

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxlm import optim
  from jaxlm.models.config_base import build_model
  from jaxlm.steps import TrainState, train_step

  config = _config(name, overrides)
  tc = config.train
  model_cfg, module = build_model(config.model.to_dict())
  optimizer, _ = optim.make_optimizer(config.opt, tc.steps)
  b, t, v = tc.batch_size, tc.seq_len, model_cfg.vocab_size

  def init(rng):
    params = nn.unbox(module.init({"params": rng}, jnp.zeros((1, t), jnp.int32))["params"])
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params))

  state = jax.jit(init)(jax.random.key(0))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  step = jax.jit(functools.partial(train_step, module=module, optimizer=optimizer, grad_accum=config.opt.grad_accum),
                 donate_argnums=(0,))
  rng = np.random.default_rng(0)
  times = []
  for _ in range(steps):
    window = rng.integers(0, v, size=(b, t + 1)).astype(np.int32)
    batch = {"inputs": window[:, :-1], "targets": window[:, 1:], "weights": np.ones((b, t), np.float32)}
    start = time.perf_counter()
    state, metrics = step(state, batch, jax.random.key(1))
    float(metrics["loss"])
    times.append(time.perf_counter() - start)
  try:
    from jaxlm import flops
    flops_per_token = flops.training_flops_per_token(model_cfg, t)
  except (ImportError, ValueError):  # a tree before jaxlm/flops.py (bench/memory.py measures older trees too)
    flops_per_token = None
  device = jax.devices()[0]
  peak_device_gib = None
  if device.platform != "cpu" and hasattr(device, "memory_stats") and device.memory_stats():
    peak_device_gib = device.memory_stats().get("peak_bytes_in_use", 0) / 2 ** 30
  return {"params": n_params, "batch": b, "length": t, "peak_rss_gib": _peak_rss_gib(),
          "peak_device_gib": peak_device_gib, "s_per_step": float(np.mean(times[1:] or times)),
          "first_step_s": times[0], "loss": float(metrics["loss"]), "flops_per_token": flops_per_token,
          "device_kind": device.device_kind, "platform": device.platform}


# ------------------------------------------------------------------------------------------------ torch
def _torch_model(name: str, config):
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  m = config.model
  if name in ("hrom", "optimus_prime", "yinggem"):
    import test_convert_families as peers
    if name == "hrom":
      return peers.HROMReference(m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff), peers.HROMBlock
    if name == "optimus_prime":
      return (peers.OptimusReference(m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff),
              peers.OptimusBlock)
    return (peers.YingGemReference(m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff, m.attention_window),
            peers.YingGemBlock)
  if name == "hrm_text1":
    import test_convert_hrm_text1 as peers
    return peers.RefHRMText1(m.vocab_size, m.d_model, m.n_heads, m.n_layers, m.d_ff, m.halt_max_steps), peers.RefBlock
  # HRM: the suite's torch HRM (tests/test_convert_hrm.py) is the original's inference loop; its training (detached
  # segments, a one-step gradient, ACT targets) has no torch re-implementation to compare with.
  return None, None


def _llama(config):
  """Hugging Face LlamaForCausalLM of the config's size (the peer bench/mfu.py names for Optimus Prime)."""
  import transformers
  m = config.model
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff, num_hidden_layers=m.n_layers,
      num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads or m.n_heads, rms_norm_eps=m.norm_eps,
      max_position_embeddings=max(m.max_seq_len, config.train.seq_len), tie_word_embeddings=False,
      attention_bias=False, mlp_bias=bool(m.mlp_bias))), None


def torch_worker(name: str, steps: int, overrides, peer: str = "reference", device: str = "cpu",
                 dtype: str = "float32", compile_model: bool = False) -> dict:
  import numpy as np
  import torch
  import torch.utils.checkpoint

  config = _config(name, overrides)
  model, block_cls = _llama(config) if peer == "llama" else _torch_model(name, config)
  if model is None:
    return {"missing": True}
  tc = config.train
  b, t, v = tc.batch_size, tc.seq_len, config.model.vocab_size
  model = model.to(device)
  remat = config.model.get("remat") or config.model.get("remat_policy", "none") != "none"
  if remat and peer == "llama":
    model.gradient_checkpointing_enable()
  elif remat and block_cls is not None:  # the jaxlm config's rematerialisation: every block
    # recomputed in the backward pass
    for block in (m for m in model.modules() if isinstance(m, block_cls)):
      forward = block.forward
      block.forward = lambda *a, _f=forward: torch.utils.checkpoint.checkpoint(_f, *a, use_reentrant=False)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
  forward = torch.compile(model) if compile_model else model
  autocast = torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype),
                            enabled=dtype != "float32")
  rng = np.random.default_rng(0)
  times = []
  for _ in range(steps):
    window = torch.tensor(rng.integers(0, v, size=(b, t + 1))).to(device)
    start = time.perf_counter()
    with autocast:
      logits = forward(window[:, :-1])
      logits = getattr(logits, "logits", logits)
      loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, v), window[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    float(loss)  # waits for the device
    times.append(time.perf_counter() - start)
  peak_device_gib = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None
  return {"params": sum(p.numel() for p in model.parameters()), "batch": b, "length": t,
          "peak_rss_gib": _peak_rss_gib(), "peak_device_gib": peak_device_gib,
          "s_per_step": float(np.mean(times[1:] or times)), "first_step_s": times[0], "loss": float(loss)}


# ------------------------------------------------------------------------------------------------ driver
def measure(kind: str, name: str, steps: int, overrides, timeout: float, torch_args=()) -> dict:
  """One worker process's result (a dict; {'error': ...} when it failed or ran out of memory)."""
  command = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--configs", name, "--steps", str(steps)]
  for item in overrides:
    command += ["--set", item]
  command += list(torch_args)
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  for line in reversed(done.stdout.splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  text = done.stderr + done.stdout
  if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or done.returncode in (-9, 137):
    return {"error": "OOM"}
  return {"error": (text.strip().splitlines() or ["exit %d" % done.returncode])[-1][:160]}


def _row(kind: str, name: str, r: dict) -> str:
  if r.get("missing"):
    return f"{name:14s} {kind:6s} (no torch peer)"
  if "error" in r:
    return f"{name:14s} {kind:6s} {r['error']}"
  return (f"{name:14s} {kind:6s} {r['params'] / 1e6:8.1f}M {r['batch']:4d} x {r['length']:<5d} "
          f"{r['peak_rss_gib']:9.2f} GiB {r['s_per_step']:9.2f} s/step")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--set", action="append", default=[],
                      help="section.field=value (both runs; model fields the torch peer lacks are ignored by it)")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--timeout", type=float, default=1800)
  parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  parser.add_argument("--torch-peer", default="reference", choices=("reference", "llama"), help=argparse.SUPPRESS)
  parser.add_argument("--torch-device", default="cpu", help=argparse.SUPPRESS)
  parser.add_argument("--torch-dtype", default="float32", help=argparse.SUPPRESS)
  parser.add_argument("--torch-compile", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  names = args.configs.split(",")
  if args.worker == "jax":
    print(json.dumps(jax_worker(names[0], args.steps, args.set)), flush=True)
    return 0
  if args.worker == "torch":
    print(json.dumps(torch_worker(names[0], args.steps, args.set, args.torch_peer, args.torch_device,
                                  args.torch_dtype, args.torch_compile)), flush=True)
    return 0
  print(f"{'config':14s} {'impl':6s} {'params':>9s} {'batch x len':12s} {'peak RSS':>13s} {'time':>16s}")
  for name in names:
    for kind in ("jaxlm",) + (() if args.no_torch else ("torch",)):
      result = measure("jax" if kind == "jaxlm" else "torch", name, args.steps, args.set, args.timeout)
      print(_row(kind, name, result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
