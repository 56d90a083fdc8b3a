"""Training loop: mesh, sharded state init, pure jitted train/eval steps, evaluation, checkpoints, metrics.

`train_and_evaluate(config, workdir)` is the whole job; running it again on the same workdir resumes from the
latest checkpoint with the same data order and dropout keys, so the loss trajectory equals an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time
from typing import Any, Dict, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxlm import checkpoint as ckpt_lib
from jaxlm import metrics as metrics_lib
from jaxlm import optim, sharding
from jaxlm.models import build_model

log = logging.getLogger("jaxlm.train")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


# ------------------------------------------------------------------------------------------ pure steps
def _loss_sums(params, batch, rng, module, deterministic=False):
  """Every architecture's `loss` method returns (objective sum, weight sum, {metric name: sum})."""
  return module.apply({"params": params}, batch, deterministic=deterministic, rngs={"dropout": rng},
                      method="loss")


def train_step(state: TrainState, batch: Dict[str, jax.Array], base_rng: jax.Array, *, module, optimizer,
               grad_accum: int) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimizer step on a global batch, split into `grad_accum` microbatches scanned in sequence.

  The gradient is d(sum of token losses)/d(params) / (number of weighted tokens), exactly the gradient of the
  mean loss over the whole batch, whatever the split.
  """
  rng = jax.random.fold_in(base_rng, state.step)

  def objective(params, mb, mb_rng):
    total, weight, sums = _loss_sums(params, mb, mb_rng, module)
    return total, (weight, sums)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  if grad_accum == 1:
    (total, (weight, sums)), grads = grad_fn(state.params, batch, rng)
  else:
    micro_batches = jax.tree.map(lambda x: x.reshape((grad_accum, -1) + x.shape[1:]), batch)

    def micro_step(acc, xs):
      mb, i = xs
      out, grads = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, acc, (out, grads)), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params, first, rng))
    ((total, (weight, sums)), grads), _ = jax.lax.scan(micro_step, zeros, (micro_batches, jnp.arange(grad_accum)))
  weight = jnp.maximum(weight, 1.0)
  grads = jax.tree.map(lambda g: g / weight, grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": total / weight, "grad_norm": optax.tree.norm(grads),
             **{k: v / weight for k, v in sums.items()}}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, module) -> Tuple[jax.Array, jax.Array]:
  """(sum of token cross-entropies, sum of weights) on one batch."""
  _, weight, sums = _loss_sums(params, batch, jax.random.key(0), module, deterministic=True)
  return sums["xent"], weight


# ------------------------------------------------------------------------------------------ setup helpers
def _model_dict(config: ml_collections.ConfigDict, vocab_size: int) -> Dict[str, Any]:
  model = config.model.to_dict()
  if not model.get("vocab_size"):
    model["vocab_size"] = vocab_size
  elif model["vocab_size"] < vocab_size:
    raise ValueError(f"model.vocab_size={model['vocab_size']} is smaller than the tokenizer's {vocab_size} ids")
  return model


def _check_same_model(saved: Dict[str, Any], current: Dict[str, Any], workdir: str) -> None:
  diff = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current) if saved.get(k) != current.get(k)}
  if diff:
    details = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
    raise ValueError(f"workdir {workdir!r} holds a different model ({details}); use a new --workdir or the "
                     f"config it was trained with")


class _StopRequest:
  """SIGTERM / first Ctrl-C ask the loop to save and exit at the next step boundary; a second Ctrl-C aborts."""

  def __init__(self):
    self.requested = False
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: signals stay with the caller
        pass
    return self

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True
    log.warning("received %s: saving a checkpoint at the end of this step, then exiting",
                signal.Signals(signum).name)

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


@dataclasses.dataclass
class TrainResult:
  step: int
  last_loss: float
  best_eval_loss: float
  eval_history: list
  stopped_early: bool
  interrupted: bool
  sample: Optional[str] = None


# ------------------------------------------------------------------------------------------ main loop
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after_steps: Optional[int] = None) -> TrainResult:
  """Trains `config` in `workdir`. `stop_after_steps` stops (saving) after that many steps of this call,
  as an interruption would; it exists for resume tests."""
  from jaxlm import data as data_lib  # heavy imports (tokenizers) only when training

  tc = config.train
  run_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_divisible(tc.batch_size, mesh)
  if tc.batch_size % config.opt.grad_accum:
    raise ValueError(f"train.batch_size={tc.batch_size} is not divisible by opt.grad_accum={config.opt.grad_accum}")
  rules = sharding.rules_from_config(config.mesh)

  tokenizer_dir = os.path.join(workdir, "tokenizer")
  eval_batch_size = tc.get("eval_batch_size", 0) or tc.batch_size
  sharding.check_batch_divisible(eval_batch_size, mesh, field="train.eval_batch_size")
  bundle = data_lib.build_data(config.data, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed,
                               tokenizer_dir=tokenizer_dir, eval_batch_size=eval_batch_size)
  model_dict = _model_dict(config, bundle.vocab_size)
  model_cfg, module = build_model(model_dict)
  model_dict = {**model_cfg.to_dict(), "family": model_dict.get("family", "")}  # family: the export format
  optimizer, schedule = optim.make_optimizer(config.opt, tc.steps)

  def init_state(rng):
    dummy = jnp.zeros((1, tc.seq_len), jnp.int32)
    params = module.init({"params": rng}, dummy)["params"]
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params))

  base_rng = jax.random.key(tc.seed)
  boxed = jax.eval_shape(init_state, base_rng)
  state_sharding = sharding.logical_shardings(boxed, mesh, rules)
  abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                nn.unbox(boxed), state_sharding)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(boxed).params))

  checkpointer = ckpt_lib.RunCheckpointer(workdir, keep=tc.keep_checkpoints)
  start_step = checkpointer.latest_step()
  run_meta: Dict[str, Any] = {"best_eval_loss": math.inf, "bad_evals": 0, "eval_history": []}
  if start_step is not None:
    _check_same_model(checkpointer.read_meta(start_step)["model"], model_dict, workdir)
    state, saved = checkpointer.restore(start_step, abstract_state, bundle.train_iter)
    run_meta.update({k: saved[k] for k in run_meta if k in saved})
    log.info("resumed from %s at step %d", workdir, start_step)
  else:
    start_step = 0
    state = jax.jit(lambda r: nn.unbox(init_state(r)), out_shardings=state_sharding)(
        jax.random.fold_in(base_rng, 1))
  ckpt_lib.write_json_atomic(os.path.join(workdir, "config.json"),
                             {"model": model_dict, "config": json.loads(config.to_json_best_effort()),
                              "tokenizer": {"dir": "tokenizer"}})

  batch_sh = sharding.batch_sharding(mesh)
  step_fn = jax.jit(
      functools.partial(train_step, module=module, optimizer=optimizer, grad_accum=config.opt.grad_accum),
      in_shardings=(state_sharding, batch_sh, sharding.replicated(mesh)),
      out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(eval_step, module=module),
                    in_shardings=(state_sharding.params, batch_sh), out_shardings=sharding.replicated(mesh))

  eval_batches = []  # built on the first evaluation, reused by the later ones

  def evaluate(params) -> float:
    if not eval_batches:
      eval_batches.extend(bundle.eval_batches())
    total, weight = 0.0, 0.0
    for batch in eval_batches:
      s, w = eval_fn(params, _shard_batch(batch, batch_sh))
      total, weight = total + float(s), weight + float(w)
    return total / max(weight, 1.0)

  def meta(step):
    return {"step": step, "model": model_dict, **run_meta}

  def save(step):
    checkpointer.save(step, state, bundle.train_iter, meta(step))

  log.info("model %s: %s parameters | mesh %s | %d train / %d validation tokens | vocab %d",
           model_dict.get("family") or model_dict["arch"], f"{n_params:,}", dict(mesh.shape),
           bundle.train_tokens, bundle.val_tokens, model_dict["vocab_size"])
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step)
  tokens_per_step = tc.batch_size * tc.seq_len
  end_step = tc.steps if stop_after_steps is None else min(tc.steps, start_step + stop_after_steps)
  progress = _progress_bar(tc, start_step)
  step, last_loss, stopped_early, interrupted = start_step, float("nan"), False, False
  window_start, window_steps, window_losses = time.perf_counter(), 0, []

  with _StopRequest() as stop:
    while step < end_step:
      batch = _shard_batch(next(bundle.train_iter), batch_sh)
      state, step_metrics = step_fn(state, batch, base_rng)
      step += 1
      window_steps += 1
      window_losses.append(step_metrics["loss"])
      if progress is not None:
        progress.update(1)

      if step % tc.log_every == 0 or step == end_step:
        losses = [float(x) for x in window_losses]  # one device sync per log interval
        elapsed = time.perf_counter() - window_start
        last_loss = losses[-1]
        row = {"step": step, "loss": float(np.mean(losses)), "tokens_per_sec": window_steps * tokens_per_step / elapsed,
               "lr": float(schedule(step - 1)), "elapsed_s": time.perf_counter() - run_start,
               **{k: float(v) for k, v in step_metrics.items() if k != "loss"}}
        if not all(map(math.isfinite, losses)):
          raise FloatingPointError(f"training loss became {losses[-1]} at step {step}; lower opt.lr or check data")
        writer.write(row)
        if progress is not None:
          progress.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_sec']:,.0f}")
        else:
          log.info("step %d loss %.4f tokens/s %.0f", step, row["loss"], row["tokens_per_sec"])
        window_start, window_steps, window_losses = time.perf_counter(), 0, []

      if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
        eval_loss = evaluate(state.params)
        writer.write({"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0)),
                      "elapsed_s": time.perf_counter() - run_start})
        run_meta["eval_history"].append([step, eval_loss])
        _log_line(progress, f"step {step}: eval loss {eval_loss:.4f} (ppl {math.exp(min(eval_loss, 50)):.2f})")
        if eval_loss < run_meta["best_eval_loss"]:
          run_meta.update(best_eval_loss=eval_loss, bad_evals=0)
          checkpointer.save_best(step, state.params, meta(step))
        else:
          run_meta["bad_evals"] += 1
          if tc.patience and run_meta["bad_evals"] >= tc.patience:
            _log_line(progress, f"early stopping: no improvement in {tc.patience} evaluations")
            stopped_early = True
        window_start = time.perf_counter()  # evaluation time is not training throughput

      if stop.requested:
        interrupted = True
      if step % tc.save_every == 0 or step == end_step or stopped_early or interrupted:
        save(step)
      if stopped_early or interrupted:
        break

  if progress is not None:
    progress.close()
  writer.close()
  checkpointer.close()
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics_path):
    metrics_lib.plot_loss_curve(metrics_path, os.path.join(workdir, "loss_curve.png"))

  sample = None
  finished = step >= tc.steps or stopped_early
  if finished and tc.sample_tokens and not interrupted:
    sample = _sample(module, state.params, bundle.tokenizer, tc, model_cfg)
    print(f"\n----- sample ({tc.sample_tokens} tokens, temperature {tc.sample_temperature}) -----\n"
          f"{sample}\n-----", flush=True)
  return TrainResult(step=step, last_loss=last_loss, best_eval_loss=run_meta["best_eval_loss"],
                     eval_history=run_meta["eval_history"], stopped_early=stopped_early,
                     interrupted=interrupted, sample=sample)


def _shard_batch(batch: Dict[str, np.ndarray], batch_sh) -> Dict[str, jax.Array]:
  """Batches always have the full batch size: the data pipeline fills a short last eval batch with weight-0 rows."""
  return {k: jax.device_put(np.asarray(v), batch_sh) for k, v in batch.items()}


def _progress_bar(tc, start_step):
  if not tc.progress:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=tc.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)


def _log_line(progress, text: str) -> None:
  if progress is not None:
    progress.write(text)
  else:
    log.info(text)


def _sample(module, params, tokenizer, tc, model_cfg) -> str:
  from jaxlm.generate import sample_ids
  params = jax.device_get(params)
  prompt = tokenizer.encode(tc.sample_prompt) or [0]
  new = sample_ids(module, params, prompt, tc.sample_tokens, context=min(tc.seq_len, model_cfg.max_seq_len),
                   temperature=tc.sample_temperature, seed=tc.seed)
  return tokenizer.decode(list(prompt) + new)
