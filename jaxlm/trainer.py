"""Training loop: mesh, sharded state init, pure jitted train/eval steps, evaluation, checkpoints, metrics.

`train_and_evaluate(config, workdir)` is the whole job; running it again on the same workdir resumes from the
latest checkpoint with the same data order and dropout keys, so the loss trajectory equals an uninterrupted run.

The same code runs as one process or as many (one per TPU VM worker / GPU node, see jaxlm.distributed). The
multi-process rules all live in `Trainer`: each process reads only the rows of each global batch its devices
hold; the primary alone writes shared files (config.json, tokenizer, metrics, plots) and shows progress; every
process takes part in checkpoint saves and restores; a stop request on any process stops all of them after the
same step.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import signal
import tempfile
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
from jaxlm import distributed, fs, optim, sharding
from jaxlm import metrics as metrics_lib
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


def eval_step(params, batch, totals, *, module) -> jax.Array:
  """`totals` + [sum of token cross-entropies, sum of weights] of one batch: an evaluation sums on the
  devices and reads the result once."""
  _, weight, sums = _loss_sums(params, batch, jax.random.key(0), module, deterministic=True)
  return totals + jnp.stack([sums["xent"], weight])


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


# ------------------------------------------------------------------------------------------ the run
class Trainer:
  """One run in one workdir: `Trainer(config, workdir).run()`.

  Setup (__init__) builds the mesh, the tokenizer, this process's data, the model and the state (restored or
  fresh); `run` is the step loop; `evaluate` and `save` are the pieces it calls.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    from jaxlm import data as data_lib  # heavy imports (tokenizers) only when training
    self.config, self.tc = config, config.train
    tc = self.tc
    self.run_start = time.perf_counter()
    self.workdir = fs.absolute(workdir)
    self.primary = distributed.is_primary()
    self.mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_divisible(tc.batch_size, self.mesh)
    if tc.batch_size % config.opt.grad_accum:
      raise ValueError(f"train.batch_size={tc.batch_size} is not divisible by opt.grad_accum={config.opt.grad_accum}")
    self.eval_batch_size = tc.get("eval_batch_size", 0) or tc.batch_size
    sharding.check_batch_divisible(self.eval_batch_size, self.mesh, field="train.eval_batch_size")
    self.batch_sh = sharding.batch_sharding(self.mesh)
    if self.primary:
      fs.makedirs(self.workdir)

    self.checkpointer = ckpt_lib.RunCheckpointer(self.workdir, keep=tc.keep_checkpoints)
    self.start_step = self.checkpointer.latest_step()
    saved_meta = self.checkpointer.read_meta(self.start_step) if self.start_step is not None else None
    # One global batch per step; older checkpoints (Grain iterator state) have no data_position.
    self.data_position = int(saved_meta.get("data_position", self.start_step)) if saved_meta else 0

    tokenizer = self._shared_tokenizer(data_lib)
    self.data = data_lib.build_data(
        config.data, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed, tokenizer=tokenizer,
        eval_batch_size=self.eval_batch_size, rows=sharding.process_rows(self.batch_sh, tc.batch_size),
        eval_rows=sharding.process_rows(self.batch_sh, self.eval_batch_size), start_batch=self.data_position)

    model_dict = _model_dict(config, self.data.vocab_size)
    self.model_cfg, self.module = build_model(model_dict)
    self.model_dict = {**self.model_cfg.to_dict(), "family": model_dict.get("family", "")}  # family: the export format
    self.optimizer, self.schedule = optim.make_optimizer(config.opt, tc.steps)
    self.base_rng = jax.random.key(tc.seed)
    boxed = jax.eval_shape(self._init_state, self.base_rng)
    self.state_sharding = sharding.logical_shardings(boxed, self.mesh, sharding.rules_from_config(config.mesh))
    self.n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(boxed).params))

    self.run_meta: Dict[str, Any] = {"best_eval_loss": math.inf, "bad_evals": 0, "eval_history": []}
    self.state = self._restore_or_init(saved_meta, boxed)
    if self.primary:
      fs.write_json_atomic(fs.join(self.workdir, "config.json"),
                           {"model": self.model_dict, "config": json.loads(config.to_json_best_effort()),
                            "tokenizer": {"dir": "tokenizer"}})
    self._compile_steps()
    self._eval_batches = None  # built on the first evaluation, reused by the later ones

  # ---------------------------------------------------------------------------------------- setup pieces
  def _restore_or_init(self, saved_meta, boxed) -> TrainState:
    """The latest checkpoint's state, laid out for this run's mesh (any mesh may have written it), or a fresh one."""
    if saved_meta is None:
      self.start_step = 0
      return jax.jit(lambda r: nn.unbox(self._init_state(r)), out_shardings=self.state_sharding)(
          jax.random.fold_in(self.base_rng, 1))
    _check_same_model(saved_meta["model"], self.model_dict, self.workdir)
    abstract_state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                  nn.unbox(boxed), self.state_sharding)
    state, saved = self.checkpointer.restore(self.start_step, abstract_state)
    self.run_meta.update({k: saved[k] for k in self.run_meta if k in saved})
    log.info("resumed from %s at step %d", self.workdir, self.start_step)
    return state

  def _compile_steps(self) -> None:
    """The jitted train and eval steps, with the state's shardings in and out and the state's buffers donated."""
    replicated = sharding.replicated(self.mesh)
    self.step_fn = jax.jit(
        functools.partial(train_step, module=self.module, optimizer=self.optimizer,
                          grad_accum=self.config.opt.grad_accum),
        in_shardings=(self.state_sharding, self.batch_sh, replicated),
        out_shardings=(self.state_sharding, replicated), donate_argnums=(0,))
    self.eval_fn = jax.jit(functools.partial(eval_step, module=self.module),
                           in_shardings=(self.state_sharding.params, self.batch_sh, replicated),
                           out_shardings=replicated)

  def _init_state(self, rng):
    dummy = jnp.zeros((1, self.tc.seq_len), jnp.int32)
    params = self.module.init({"params": rng}, dummy)["params"]
    return TrainState(step=jnp.int32(0), params=params, opt_state=self.optimizer.init(params))

  def _shared_tokenizer(self, data_lib):
    """The run's tokenizer: the primary loads the saved one or builds and saves it; the others load what it
    saved, so every process has the same vocabulary even when building one is not deterministic."""
    tokenizer_dir = fs.join(self.workdir, "tokenizer")
    saved = fs.exists(fs.join(tokenizer_dir, "tokenizer.json"))
    tokenizer = None
    if self.primary:
      if not fs.is_remote(tokenizer_dir):
        tokenizer = data_lib.resolve_tokenizer(self.config.data, tokenizer_dir)
      else:  # tokenizers read and write local files: work on a local copy, upload a new one
        local = fs.local_dir(tokenizer_dir) if saved else tempfile.mkdtemp(prefix="jaxlm-tokenizer-")
        tokenizer = data_lib.resolve_tokenizer(self.config.data, local)
        if not saved:
          fs.copy_tree(local, tokenizer_dir)
    distributed.sync("jaxlm:tokenizer")
    if tokenizer is None:
      if not fs.exists(fs.join(tokenizer_dir, "tokenizer.json")):
        raise FileNotFoundError(
            f"process {jax.process_index()} cannot see the tokenizer process 0 saved in {tokenizer_dir!r}: the "
            "workdir must be on storage every process shares (gs://, NFS)")
      tokenizer = data_lib.load_tokenizer(fs.local_dir(tokenizer_dir))
    return tokenizer

  # ---------------------------------------------------------------------------------------- loop pieces
  def _global(self, batch, batch_size: int) -> Dict[str, jax.Array]:
    return sharding.global_batch(batch, self.batch_sh, batch_size)

  def evaluate(self, params) -> float:
    """Mean token cross-entropy over the validation batches; summed on the devices, one read at the end."""
    if self._eval_batches is None:
      self._eval_batches = self.data.eval_batches()
    totals = jax.device_put(np.zeros((2,), np.float32), sharding.replicated(self.mesh))  # as eval_fn returns it
    for batch in self._eval_batches:
      totals = self.eval_fn(params, self._global(batch, self.eval_batch_size), totals)
    total, weight = (float(x) for x in jax.device_get(totals))
    return total / max(weight, 1.0)

  def _meta(self, step: int) -> Dict[str, Any]:
    return {"step": step, "model": self.model_dict, "data_position": self.data_position, **self.run_meta}

  def save(self, step: int) -> None:
    self.checkpointer.save(step, self.state, self._meta(step))

  def _log(self, text: str) -> None:
    if self.primary:
      _log_line(self.progress, text)

  def run(self, stop_after_steps: Optional[int] = None) -> TrainResult:
    """Trains to `train.steps` (or early stopping, or a stop request). `stop_after_steps` stops (saving) after
    that many steps of this call, as an interruption would; it exists for resume tests."""
    tc = self.tc
    log.info("model %s: %s parameters | mesh %s | %d process(es) | %d train / %d validation tokens | vocab %d",
             self.model_dict.get("family") or self.model_dict["arch"], f"{self.n_params:,}", dict(self.mesh.shape),
             jax.process_count(), self.data.train_tokens, self.data.val_tokens, self.model_dict["vocab_size"])
    writer = metrics_lib.MetricsWriter(self.workdir, resume_step=self.start_step) if self.primary else None
    tokens_per_step = tc.batch_size * tc.seq_len
    end_step = tc.steps if stop_after_steps is None else min(tc.steps, self.start_step + stop_after_steps)
    self.progress = _progress_bar(tc, self.start_step) if self.primary else None
    step, last_loss, stopped_early, interrupted = self.start_step, float("nan"), False, False
    window_start, window_steps, window_losses = time.perf_counter(), 0, []
    vote = distributed.StopVote()

    with _StopRequest() as stop:
      while step < end_step:
        batch = self._global(next(self.data.train_iter), tc.batch_size)
        self.state, step_metrics = self.step_fn(self.state, batch, self.base_rng)
        step += 1
        self.data_position += 1
        window_steps += 1
        window_losses.append(step_metrics["loss"])
        if self.progress is not None:
          self.progress.update(1)
        interrupted = vote.vote(stop.requested)  # the same answer, at the same step, on every process

        if step % tc.log_every == 0 or step == end_step:
          losses = [float(x) for x in window_losses]  # one device sync per log interval
          elapsed = time.perf_counter() - window_start
          last_loss = losses[-1]
          if not all(map(math.isfinite, losses)):
            raise FloatingPointError(f"training loss became {losses[-1]} at step {step}; lower opt.lr or check data")
          row = {"step": step, "loss": float(np.mean(losses)),
                 "tokens_per_sec": window_steps * tokens_per_step / elapsed,
                 "lr": float(self.schedule(step - 1)), "elapsed_s": time.perf_counter() - self.run_start,
                 **{k: float(v) for k, v in step_metrics.items() if k != "loss"}}
          if writer is not None:
            writer.write(row)
          if self.progress is not None:
            self.progress.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_sec']:,.0f}")
          elif self.primary:
            log.info("step %d loss %.4f tokens/s %.0f", step, row["loss"], row["tokens_per_sec"])
          window_start, window_steps, window_losses = time.perf_counter(), 0, []

        if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
          eval_loss = self.evaluate(self.state.params)
          if writer is not None:
            writer.write({"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0)),
                          "elapsed_s": time.perf_counter() - self.run_start})
          self.run_meta["eval_history"].append([step, eval_loss])
          self._log(f"step {step}: eval loss {eval_loss:.4f} (ppl {math.exp(min(eval_loss, 50)):.2f})")
          if eval_loss < self.run_meta["best_eval_loss"]:
            self.run_meta.update(best_eval_loss=eval_loss, bad_evals=0)
            self.checkpointer.save_best(step, self.state.params, self._meta(step))
          else:
            self.run_meta["bad_evals"] += 1
            if tc.patience and self.run_meta["bad_evals"] >= tc.patience:
              self._log(f"early stopping: no improvement in {tc.patience} evaluations")
              stopped_early = True
          window_start = time.perf_counter()  # evaluation time is not training throughput

        if step % tc.save_every == 0 or step == end_step or stopped_early or interrupted:
          self.save(step)
        if stopped_early or interrupted:
          break

    if self.progress is not None:
      self.progress.close()
    self.checkpointer.close()  # waits for the saves in flight
    if interrupted:  # every process says it, so each host's log shows where the run stopped
      log.warning("stopped on request after step %d (process %d); checkpoint saved, rerun the same command to "
                  "resume", step, jax.process_index())
    if writer is not None:
      writer.close()
      metrics_path = fs.join(self.workdir, "metrics.jsonl")
      if fs.exists(metrics_path):
        metrics_lib.plot_loss_curve(metrics_path, fs.join(self.workdir, "loss_curve.png"))

    sample = None
    finished = step >= tc.steps or stopped_early
    if finished and tc.sample_tokens and not interrupted:
      sample = self._sample()
    return TrainResult(step=step, last_loss=last_loss, best_eval_loss=self.run_meta["best_eval_loss"],
                       eval_history=self.run_meta["eval_history"], stopped_early=stopped_early,
                       interrupted=interrupted, sample=sample)

  def _sample(self) -> Optional[str]:
    """A short generation from the final parameters, printed by the primary."""
    if jax.process_count() > 1:  # every process takes part in gathering the sharded parameters
      from jax.experimental import multihost_utils
      params = multihost_utils.process_allgather(self.state.params, tiled=True)
    else:
      params = jax.device_get(self.state.params)
    if not self.primary:
      return None
    tc = self.tc
    sample = _sample(self.module, params, self.data.tokenizer, tc, self.model_cfg)
    print(f"\n----- sample ({tc.sample_tokens} tokens, temperature {tc.sample_temperature}) -----\n"
          f"{sample}\n-----", flush=True)
    return sample


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after_steps: Optional[int] = None) -> TrainResult:
  """Trains `config` in `workdir` (see Trainer). `stop_after_steps` stops (saving) after that many steps of this
  call, as an interruption would; it exists for resume tests."""
  return Trainer(config, workdir).run(stop_after_steps)


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
  prompt = tokenizer.encode(tc.sample_prompt) or [0]
  new = sample_ids(module, params, prompt, tc.sample_tokens, context=min(tc.seq_len, model_cfg.max_seq_len),
                   temperature=tc.sample_temperature, seed=tc.seed)
  return tokenizer.decode(list(prompt) + new)
