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

import collections
import dataclasses
import functools
import json
import logging
import math
import signal
import tempfile
import time
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from etils import epath

from jaxlm import checkpoint as ckpt_lib
from jaxlm import auto_grow, checksum, distributed, flops, fs, gen_defaults, optim, sharding
from jaxlm import init_from as init_lib
from jaxlm import lineage, pairwise_sum, start_choice, xla_options
from jaxlm import lock as lock_lib
from jaxlm import metrics as metrics_lib
from jaxlm.models import build_model
from jaxlm.models.config_base import COMPUTE_ONLY_FIELDS
from jaxlm.steps import TrainState, eval_step, train_step, train_step_on_chunk

log = logging.getLogger("jaxlm.train")
# The loop dispatches a step at most this many steps ahead of the devices. Unbounded, a run that logs rarely queued
# hundreds of steps, and XLA:CPU's in-process collectives then deadlocked on several devices (yinggem:tiny on 2
# devices with log_every=1500 aborted after a 40 s rendezvous timeout, with XLA's all-reduce and with
# pairwise_sum alike). Two steps keep the devices busy while the host prepares the next batch.
MAX_STEPS_AHEAD = 2


class _RunAhead:
  """The loop's bound: after each dispatch, waits for the oldest pending program once more than MAX_STEPS_AHEAD are
  pending (train steps, evaluation batches)."""

  def __init__(self):
    self.pending = collections.deque()

  def dispatched(self, output: jax.Array) -> None:
    self.pending.append(output)
    if len(self.pending) > MAX_STEPS_AHEAD:
      jax.block_until_ready(self.pending.popleft())


# ------------------------------------------------------------------------------------------ setup helpers
def _model_dict(config: ml_collections.ConfigDict, vocab_size: int) -> Dict[str, Any]:
  model = config.model.to_dict()
  if not model.get("vocab_size"):
    model["vocab_size"] = vocab_size
  elif model["vocab_size"] < vocab_size:
    raise ValueError(f"model.vocab_size={model['vocab_size']} is smaller than the tokenizer's {vocab_size} ids")
  return model


def _check_same_model(saved: Dict[str, Any], current: Dict[str, Any], workdir: str) -> None:
  """Refuses a checkpoint of another model; fields that only change the computation (dtype, remat, attention
  implementation, ...) may differ, as may fields added since it was written whose default it computes with."""
  defaults = {}
  if saved.get("arch", "decoder") == current.get("arch", "decoder"):
    config_cls = type(build_model(current)[0])
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
  diff = {k: (saved.get(k, defaults.get(k)), current.get(k)) for k in set(saved) | set(current)
          if k not in COMPUTE_ONLY_FIELDS and saved.get(k, defaults.get(k)) != current.get(k)}
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


class CheckpointWriteFailed(RuntimeError):
  """A checkpoint could not be written (full disk, permissions, ...); the previous ones are intact."""


class NonFiniteLoss(FloatingPointError):
  """The loss, a gradient or the validation loss became NaN/Inf and train.on_nonfinite is 'stop'."""


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
    self.lock = None
    self.checkpointer = None
    try:
      self._setup(config, workdir)
    except BaseException:
      self.close()
      raise

  def _setup(self, config: ml_collections.ConfigDict, workdir: str) -> None:
    from jaxlm import data as data_lib  # heavy imports (tokenizers) only when training
    from jaxlm import validate
    self.parent = init_lib.load_parent(config.train)  # train.init_from: the model and tokenizer come from it
    start_over = self._choose_at_start(config, workdir)  # a model that has not seen this corpus: continue it?
    if self.parent is not None:
      config = init_lib.adopt_parent(config, self.parent)
    for warning in validate.check_config(config):  # every field in range before any work
      log.warning("config: %s", warning)
    self.config, self.tc = config, config.train
    tc = self.tc
    self.run_start = time.perf_counter()
    self.workdir = fs.absolute(workdir)
    self.primary = distributed.is_primary()
    self.mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_divisible(tc.batch_size, self.mesh)
    if tc.batch_size % config.opt.grad_accum:
      raise ValueError(f"train.batch_size={tc.batch_size} is not divisible by opt.grad_accum={config.opt.grad_accum}")
    sharding.check_microbatch_divisible(tc.batch_size, config.opt.grad_accum, self.mesh)
    self.eval_batch_size = tc.get("eval_batch_size", 0) or tc.batch_size
    sharding.check_batch_divisible(self.eval_batch_size, self.mesh, field="train.eval_batch_size")
    self.batch_sh = sharding.batch_sharding(self.mesh)
    self._take_workdir()
    if start_over:
      self._set_aside_previous_run()

    self.checkpointer = ckpt_lib.RunCheckpointer(self.workdir, keep=tc.keep_checkpoints)
    self._fill_replay_corpus(config.data)
    self.prepared_roots = self._prepared_dataset(data_lib)
    tokenizer = self._shared_tokenizer(data_lib)
    self.vocab_growth = None
    if self.parent is not None and tokenizer.vocab_size > int(self.parent.model_dict["vocab_size"]):
      config.data.vocab_size = config.model.vocab_size = tokenizer.vocab_size  # grown from the parent's
    model_dict = _model_dict(config, int(config.data.get("vocab_size", 0)) or tokenizer.vocab_size)
    if tc.get("grow_every_chars"):  # a resumed run that grew continues with its grown depth
      model_dict = auto_grow.resumed_model(model_dict, self._latest_saved_model())
      auto_grow.check_growable(model_dict)
    self.model_cfg, self.module = build_model(model_dict)
    self.model_dict = {**self.model_cfg.to_dict(), "family": model_dict.get("family", "")}  # family: the export format
    self._param_names = None
    self.optimizer, self.schedule = self._make_optimizer(config.opt)
    self.base_rng = jax.random.key(tc.seed)
    boxed = jax.eval_shape(self._init_state, self.base_rng)
    self.state_sharding = sharding.logical_shardings(boxed, self.mesh, sharding.rules_from_config(config.mesh))
    self.n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(boxed).params))
    try:
      self.flops_per_token = flops.training_flops_per_token(self.model_cfg, tc.seq_len)
    except ValueError:
      self.flops_per_token = None
    self.peak_tflops = flops.peak_tflops(jax.devices()[0].device_kind)

    self.run_meta: Dict[str, Any] = {"best_eval_loss": math.inf, "bad_evals": 0, "eval_history": []}
    self.state, saved_meta = self._restore_or_init(boxed)
    # One global batch per step; older checkpoints (Grain iterator state) have no data_position.
    self.data_position = int(saved_meta.get("data_position", self.start_step)) if saved_meta else 0
    self.data = data_lib.build_prepared_data(
        self.prepared_roots, config.data, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed, tokenizer=tokenizer,
        eval_batch_size=self.eval_batch_size, rows=sharding.process_rows(self.batch_sh, tc.batch_size),
        eval_rows=sharding.process_rows(self.batch_sh, self.eval_batch_size), start_batch=self.data_position)
    self.history = self._start_history(tokenizer)
    if self.vocab_growth is not None:
      self.history = lineage.with_event(self.history, self.vocab_growth)
    self._write_config()
    self.batches_per_put = int(tc.get("batches_per_put", 1) or 1)
    self._placed = None  # the loop's batches, read ahead by up to batches_per_put - 1 (kept across run() calls)
    self._compile_steps()
    self._eval_batches = None  # built on the first evaluation, reused by the later ones
    self._eval_subset = None  # train.eval_windows' batches, on the devices
    self._unchecked_flags = []  # metrics["nonfinite"] of the steps not yet read back

  # ---------------------------------------------------------------------------------------- setup pieces
  def _choose_at_start(self, config, workdir: str) -> bool:
    """train.on_new_corpus (jaxlm.start_choice): 'fresh' drops the init_from parent, or returns True to set the
    workdir's earlier run aside."""
    setting, corpus = str(config.train.get("on_new_corpus", "ask") or "ask"), str(config.data.corpus)
    path = fs.absolute(workdir)
    resuming = fs.exists(fs.join(path, "checkpoints")) and fs.exists(fs.join(path, "config.json"))
    if resuming:
      history = lineage.read(path)
      last = history[-1] if history else {}
      choice = start_choice.at_start(setting, corpus, path, history, last.get("vocab_size"), last.get("params"),
                                     primary=distributed.is_primary())
      return choice == "fresh"
    if self.parent is not None:
      history = lineage.read(self.parent.path)
      params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(self.parent.params))
      choice = start_choice.at_start(setting, corpus, self.parent.path, history,
                                     self.parent.model_dict.get("vocab_size"), params,
                                     primary=distributed.is_primary())
      if choice == "fresh":
        log.info("starting a new model (train.on_new_corpus): train.init_from=%s is not used", self.parent.path)
        self.parent = None
    return False

  def _fill_replay_corpus(self, data_cfg) -> None:
    """data.replay without data.replay_corpus replays what the model was trained on before: the corpora of the
    init_from parent's history (a resumed run: of its own history's earlier entries)."""
    from jaxlm.data import prepared
    if float(data_cfg.get("replay", 0.0) or 0.0) <= 0 or str(data_cfg.get("replay_corpus", "") or "").strip():
      return
    if self.parent is not None:
      earlier = lineage.read(self.parent.path)
    else:
      earlier = lineage.read(self.workdir)[:-1] if fs.exists(fs.join(self.workdir, "checkpoints")) else []
    data_cfg.replay_corpus = ",".join(prepared.earlier_corpora(earlier))
    if prepared.replay_specs(data_cfg):
      log.info("data.replay=%s of the examples come from earlier corpora: %s", data_cfg.replay,
               ", ".join(prepared.replay_specs(data_cfg)))

  def _set_aside_previous_run(self) -> None:
    """'fresh' in a workdir that holds a run: its files move to workdir/previous-TIME/ (nothing is deleted)."""
    if self.primary:
      aside = fs.join(self.workdir, "previous-" + time.strftime("%Y%m%d-%H%M%S"))
      fs.makedirs(aside)
      for name in ("checkpoints", "best", "tokenizer", "config.json", "metrics.jsonl", "tensorboard",
                   "loss_curve.png"):
        if fs.exists(fs.join(self.workdir, name)):
          epath.Path(fs.join(self.workdir, name)).rename(fs.join(aside, name))
      log.warning("starting a new model in %s; the previous run is in %s", self.workdir, aside)
    distributed.sync("jaxlm:set-aside")

  def _start_history(self, tokenizer) -> list:
    """The lineage in config.json: a resumed run keeps its own; a new one appends an entry to its parent's."""
    self.chars_per_token = 1.0 if tokenizer.kind in ("char", "vocab") else _chars_per_token(self.data, tokenizer)
    if self.start_step:
      kept = lineage.read(self.workdir)
      if kept:
        return kept
    from jaxlm.data import prepared
    parent = lineage.read(self.parent.path) if self.parent is not None else []
    stage = lineage.entry(prepared.label(self.config.data), vocab_size=int(self.model_dict["vocab_size"]),
                          params=self.n_params, origin=self.parent.path if self.parent is not None else None)
    replayed = prepared.replay_specs(self.config.data) if float(self.config.data.get("replay", 0.0) or 0.0) else []
    if replayed:
      stage["replay"] = {"fraction": float(self.config.data.replay), "corpora": replayed}
    return parent + [stage]

  def _write_config(self, step: Optional[int] = None, finished: bool = False) -> None:
    """config.json (primary only): the model, the config, the tokenizer's place and the history so far."""
    if step is not None:
      tokens = step * self.tc.batch_size * self.tc.seq_len
      chars = None if self.chars_per_token is None else round(tokens * self.chars_per_token)
      self.history = lineage.with_progress(self.history, steps=step, tokens=tokens, chars=chars, finished=finished)
    if self.primary:
      fs.write_json_atomic(fs.join(self.workdir, "config.json"),
                           {"model": self.model_dict, "config": json.loads(self.config.to_json_best_effort()),
                            "tokenizer": {"dir": "tokenizer"}, "history": self.history,
                            "generation": gen_defaults.for_family(self.model_dict.get("family", ""))})

  def _take_workdir(self) -> None:
    """Creates the workdir and takes its lock (the primary; the others learn whether it succeeded)."""
    problem = None
    if self.primary:
      try:
        if fs.exists(self.workdir) and not epath.Path(self.workdir).is_dir():
          raise ValueError(f"--workdir {self.workdir} is a file, not a directory")
        fs.makedirs(self.workdir)
        self.lock = lock_lib.WorkdirLock(self.workdir)
        self.lock.acquire()
      except (OSError, ValueError, lock_lib.WorkdirLocked) as e:
        problem = e
    if distributed.any_process(problem is not None):
      raise problem if problem is not None else lock_lib.WorkdirLocked(
          f"process 0 could not take the workdir {self.workdir} (see its log)")

  def _restore_or_init(self, boxed) -> Tuple[TrainState, Optional[Dict[str, Any]]]:
    """(state, saved metadata) of the newest checkpoint that restores and verifies, laid out for this run's mesh
    (any mesh may have written it); or a fresh state and None. Damaged checkpoints are reported, skipped and,
    once an older one restores, moved to workdir/corrupt/."""
    abstract_state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                  nn.unbox(boxed), self.state_sharding)
    damaged = []
    for step in self.checkpointer.steps_newest_first():
      try:
        meta = self.checkpointer.read_meta(step)
        _check_same_model(meta["model"], self.model_dict, self.workdir)
        self._check_same_state_layout(meta, abstract_state)
        state, saved = self.checkpointer.restore(step, abstract_state)
        failure = None
      except ckpt_lib.CheckpointUnusable as e:
        failure = e
      if distributed.any_process(failure is not None):
        damaged.append(step)
        log.error("%s; trying the previous checkpoint", failure or f"checkpoint {step} fails on another process")
        continue
      for bad in damaged:
        log.warning("moved the damaged checkpoint %s to %s", bad, self.checkpointer.quarantine(bad))
      self.start_step = step
      self.run_meta.update({k: saved[k] for k in self.run_meta if k in saved})
      log.info("resumed from %s at step %d", self.workdir, step)
      return state, saved
    if damaged and self.tc.on_unrestorable != "fresh":
      raise ckpt_lib.CheckpointUnusable(
          f"no checkpoint in {fs.join(self.workdir, 'checkpoints')} restores (steps {damaged} are damaged, see "
          "above); rerun with --config.train.on_unrestorable=fresh to start over in this workdir")
    for bad in damaged:
      log.warning("starting over: moved the damaged checkpoint %s to %s", bad, self.checkpointer.quarantine(bad))
    self.start_step = 0
    if self.parent is not None:
      return self._state_from_parent(abstract_state), None
    state = jax.jit(lambda r: nn.unbox(self._init_state(r)), out_shardings=self.state_sharding)(
        jax.random.fold_in(self.base_rng, 1))
    return state, None

  def _state_from_parent(self, abstract_state) -> TrainState:
    """Step 0 of a run from train.init_from: the parent's parameters, a fresh optimizer state (or the parent's,
    with train.init_optimizer)."""
    n_old = int(self.parent.model_dict["vocab_size"])
    if self.tc.get("init_optimizer") and self.model_dict["vocab_size"] != n_old:
      raise ValueError(f"train.init_optimizer: the vocabulary grew from {n_old} to {self.model_dict['vocab_size']} "
                       f"ids on {self.config.data.corpus!r}, so the parent's optimizer state does not fit; leave it off")
    if self.tc.get("init_optimizer"):
      state = init_lib.restore_parent_state(self.parent, abstract_state)
      state = dataclasses.replace(state, step=jax.device_put(jnp.int32(0), self.state_sharding.step))
    else:
      params = init_lib.place(init_lib.initial_params(self.parent, self.model_dict, self._grown_parent_params()),
                              self.state_sharding.params)
      opt_state = jax.jit(self.optimizer.init, out_shardings=self.state_sharding.opt_state)(params)
      state = TrainState(step=jax.device_put(jnp.int32(0), self.state_sharding.step), params=params,
                         opt_state=opt_state)
    log.info("started from %s (%s)", self.parent.path, "parameters and optimizer state" if
             self.tc.get("init_optimizer") else "parameters; fresh optimizer state")
    return state

  def _grown_parent_params(self):
    """The parent's canonical params with rows for the ids its tokenizer gained (None when none were added)."""
    from jaxlm import vocab_growth
    n_old, n_new = int(self.parent.model_dict["vocab_size"]), int(self.model_dict["vocab_size"])
    if n_new == n_old:
      return None
    tokenizer = data_lib_tokenizer(fs.local_dir(fs.join(self.workdir, "tokenizer")))
    probe = init_lib.probe_windows(self.config.data, tokenizer, n_old, self.tc.seq_len)
    growth = vocab_growth.grow_checked(self.parent.model_dict, self.parent.params, n_new - n_old, probe)
    self.vocab_growth = {"kind": "vocab", "step": 0, "vocab_before": n_old, "vocab_after": n_new,
                         "added": tokenizer.decode(list(range(n_old, n_new))), "at": lineage.now(), **growth.figures}
    log.info("vocabulary grown %d -> %d ids: %s", n_old, n_new, growth.figures)
    return growth.params

  def _latest_saved_model(self) -> Optional[Dict[str, Any]]:
    for step in self.checkpointer.steps_newest_first():
      try:
        return self.checkpointer.read_meta(step)["model"]
      except (ckpt_lib.CheckpointUnusable, KeyError):
        continue
    return None

  def _chars_per_step(self) -> float:
    return (self.chars_per_token or 0.0) * self.tc.batch_size * self.tc.seq_len

  def _grow(self, step: int) -> None:
    """train.grow_every_chars: identity blocks added after `step` (jaxlm.auto_grow), optimizer state kept or
    reset, steps recompiled, the event recorded in history."""
    from jaxlm.models import layout
    host = _host_tree(self.state)
    before = self.n_params
    canon_dict, params = layout.canonical(self.model_dict, host.params)
    grown_dict, params = auto_grow.grown_model(canon_dict, params, int(self.tc.grow_layers))
    run_dict = {**grown_dict, **{k: self.model_dict[k] for k in init_lib.RUN_FIELDS if k in self.model_dict}}
    self.model_cfg, self.module = build_model(run_dict)
    self.model_dict = {**self.model_cfg.to_dict(), "family": self.model_dict.get("family", "")}
    # The optimizer knows parameters by name (Muon's matrices): the new blocks' too.
    self._param_names = None
    self.optimizer, self.schedule = self._make_optimizer(self.config.opt)
    boxed = jax.eval_shape(self._init_state, self.base_rng)
    self.state_sharding = sharding.logical_shardings(boxed, self.mesh, sharding.rules_from_config(self.config.mesh))
    params = init_lib.to_run_layout(self.model_dict, params)
    opt_state = jax.tree.map(np.asarray, self.optimizer.init(params))
    reset = bool(self.tc.get("grow_reset_optimizer"))
    if not reset:
      opt_state = auto_grow.carry_over(host.opt_state, opt_state)
    self.state = TrainState(step=jax.device_put(jnp.int32(step), self.state_sharding.step),
                            params=init_lib.place(params, self.state_sharding.params),
                            opt_state=init_lib.place(opt_state, self.state_sharding.opt_state))
    self.n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    try:
      self.flops_per_token = flops.training_flops_per_token(self.model_cfg, self.tc.seq_len)
    except ValueError:
      self.flops_per_token = None
    self._compile_steps()
    chars = round(step * self._chars_per_step())
    added = {"layers": int(self.tc.grow_layers)} if "n_layers" in grown_dict else {
        "l_layers": int(self.tc.grow_layers), "h_layers": int(self.tc.grow_layers)}
    self.history = lineage.with_event(self.history, auto_grow.event(step, chars, added, before, self.n_params,
                                                                    reset, lineage.now()))
    self._log(f"step {step}: grown after {chars:,} characters: {added}, {before:,} -> {self.n_params:,} "
              f"parameters, optimizer state {'reset' if reset else 'kept'}")

  def _check_same_state_layout(self, meta: Dict[str, Any], abstract_state) -> None:
    """A checkpoint whose arrays are not the ones this config's state has (e.g. opt.clip_norm switched on since)
    is refused naming the config fields that make the difference, not restored into a mismatched tree."""
    recorded = set(meta.get("checksums") or ())
    current = set(checksum.leaf_names(abstract_state))
    if not recorded or recorded == current:
      return
    saved_opt = meta.get("opt") or {}
    now_opt = self.config.opt.to_dict()
    changed = sorted(k for k in now_opt if k in saved_opt and saved_opt[k] != now_opt[k])

    def opt_leaves(opt_values):
      optimizer, _ = self._make_optimizer(ml_collections.ConfigDict(opt_values))
      return checksum.leaf_names(jax.eval_shape(optimizer.init, abstract_state.params))

    saved_leaves = opt_leaves(saved_opt) if saved_opt else None
    culprits = [k for k in changed if opt_leaves({**saved_opt, k: now_opt[k]}) != saved_leaves]
    if culprits:
      what = ", ".join(f"opt.{k}: checkpoint {saved_opt[k]!r} vs config {now_opt[k]!r}" for k in culprits)
    else:
      diff = sorted(recorded ^ current)
      what = f"{len(diff)} arrays differ, e.g. {diff[0]}"
    raise ValueError(f"workdir {self.workdir!r} holds a train state with different arrays ({what}); resume with "
                     "the checkpoint's settings or use a new --workdir")

  def _compile_steps(self) -> None:
    """The jitted train and eval steps, with the state's shardings in and out and the state's buffers donated."""
    replicated = sharding.replicated(self.mesh)
    rules = sharding.rules_from_config(self.config.mesh)
    on_mesh = lambda fn: sharding.tracing_with_activation_sharding(fn, self.mesh, rules)
    grad_sum = self.config.mesh.get("grad_sum", "auto")
    per_device = None
    if pairwise_sum.choose(grad_sum, self.mesh):
      per_device = functools.partial(pairwise_sum.per_device_sums, mesh=self.mesh,
                                     same_randomness=grad_sum == "auto")
    step = functools.partial(train_step, module=self.module, optimizer=self.optimizer,
                             grad_accum=self.config.opt.grad_accum,
                             microbatch_sharding=sharding.microbatch_sharding(self.mesh), per_device=per_device)
    placed_sh = self.batch_sh
    if self.batches_per_put > 1:  # its second argument is then (K batches, index), what _placed_batches yields
      step = functools.partial(train_step_on_chunk, step=step, batch_sharding=self.batch_sh)
      placed_sh = (sharding.chunk_sharding(self.batch_sh), replicated)
    self.step_fn = jax.jit(on_mesh(step), in_shardings=(self.state_sharding, placed_sh, replicated),
                           out_shardings=(self.state_sharding, replicated), donate_argnums=(0,),
                           compiler_options=xla_options.train_step(self.mesh))
    self.eval_fn = jax.jit(on_mesh(functools.partial(eval_step, module=self.module)),
                           in_shardings=(self.state_sharding.params, self.batch_sh, replicated),
                           out_shardings=replicated)

  def _make_optimizer(self, opt_cfg):
    """optim.make_optimizer for this model; Muon is told the parameters' logical axis names (traced once per
    model, abstractly; other optimizers need none)."""
    names = None
    if opt_cfg.get("name") == "muon":
      if self._param_names is None:
        boxed = jax.eval_shape(self.module.init, jax.random.key(0), jnp.zeros((1, self.tc.seq_len), jnp.int32))
        self._param_names = optim.param_axis_names(boxed["params"])
      names = self._param_names
    return optim.make_optimizer(opt_cfg, self.tc.steps, names)

  def _init_state(self, rng):
    dummy = jnp.zeros((1, self.tc.seq_len), jnp.int32)
    params = self.module.init({"params": rng}, dummy)["params"]
    return TrainState(step=jnp.int32(0), params=params, opt_state=self.optimizer.init(params))

  def _prepared_dataset(self, data_lib) -> list:
    """The prepared dataset(s) the config reads (jaxlm.data.prepared): the primary finds it or prepares it (with the
    run's tokenizer when resuming); the others find what it made, so no process tokenizes on a resume."""
    problem, digest = None, None
    tokenizer_dir = fs.join(self.workdir, "tokenizer")
    if self.primary:
      try:
        if self.parent is not None and not fs.exists(fs.join(tokenizer_dir, "tokenizer.json")):
          # A new run from a parent tokenizes with the parent's tokenizer, grown by the characters of this corpus
          # it lacks (vocabulary growth, see jaxlm.vocab_growth): written before the data is prepared with it.
          init_lib.seed_tokenizer(self.parent, tokenizer_dir, init_lib.grown_tokenizer(self.parent, self.config.data))
        saved = (data_lib.load_tokenizer(fs.local_dir(tokenizer_dir))
                 if fs.exists(fs.join(tokenizer_dir, "tokenizer.json")) else None)
        digest = self._tokenizer_digest(saved)
        data_lib.prepared.ensure_all(self.config.data, tokenizer=saved, progress=self.tc.progress,
                                     tokenizer_digest=digest)
      except Exception as e:  # noqa: BLE001: re-raised below, after telling the other processes
        problem = e
    if distributed.any_process(problem is not None):
      raise problem if problem is not None else RuntimeError("process 0 could not prepare the data (see its log)")
    if digest is None:  # the other processes read the tokenizer process 0 wrote
      digest = self._tokenizer_digest(
          data_lib.load_tokenizer(fs.local_dir(tokenizer_dir)) if self.parent is not None else None)
    roots = data_lib.prepared.find_all(self.config.data, digest)
    if roots is None:
      raise FileNotFoundError(
          f"process {jax.process_index()} cannot see the dataset process 0 prepared under "
          f"{data_lib.prepared.cache_dir(self.config.data)}: data.cache_dir must be storage every process shares "
          "(NFS), or run python -m jaxlm.prepare with the same config on every host first")
    return roots

  def _tokenizer_digest(self, saved) -> str:
    """A run from a parent tokenizes with the parent's (grown) vocabulary, not the one the config would learn:
    its prepared datasets are keyed by that vocabulary too, so a fresh run on the same corpus never reads them."""
    from jaxlm.data.tokenizers import digest
    return digest(saved) if self.parent is not None and saved is not None else ""

  def _shared_tokenizer(self, data_lib):
    """The run's tokenizer: the primary loads the saved one or builds and saves it; the others load what it
    saved, so every process has the same vocabulary even when building one is not deterministic."""
    tokenizer_dir = fs.join(self.workdir, "tokenizer")
    saved = fs.exists(fs.join(tokenizer_dir, "tokenizer.json"))
    tokenizer = None
    if self.primary:
      if not fs.is_remote(tokenizer_dir):
        tokenizer = data_lib.run_tokenizer(self.prepared_roots[0], tokenizer_dir)
      else:  # tokenizers read and write local files: work on a local copy, upload a new one
        local = fs.local_dir(tokenizer_dir) if saved else tempfile.mkdtemp(prefix="jaxlm-tokenizer-")
        tokenizer = data_lib.run_tokenizer(self.prepared_roots[0], local)
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

  def _placed_batches(self):
    """Endless: step_fn's second argument for each step, in data order. With train.batches_per_put = K > 1,
    K batches are read, stacked and placed on the devices with one transfer, then handed out as (chunk, index)
    with the indices placed once; the data position still advances a batch a step, so a checkpoint or a resume
    is where it would be without read-ahead."""
    k = self.batches_per_put
    if k == 1:
      while True:
        yield self._global(next(self.data.train_iter), self.tc.batch_size)
    chunk_sh = sharding.chunk_sharding(self.batch_sh)
    indices = [jax.device_put(np.int32(i), sharding.replicated(self.mesh)) for i in range(k)]
    while True:
      chunk = sharding.global_chunk([next(self.data.train_iter) for _ in range(k)], chunk_sh, self.tc.batch_size)
      for index in indices:
        yield chunk, index

  def evaluate(self, params, full: bool = True) -> float:
    """Mean token cross-entropy over the whole validation split (`full`), or over the train.eval_windows random
    windows evaluations during training read (the same each time, kept on the devices after the first); summed
    on the devices, one read at the end."""
    totals = jax.device_put(np.zeros((2,), np.float32), sharding.replicated(self.mesh))  # as eval_fn returns it
    run_ahead = _RunAhead()  # a large split queued at once deadlocked XLA:CPU's collectives like the train steps
    for batch in self._validation_batches(full):
      totals = self.eval_fn(params, batch, totals)
      run_ahead.dispatched(totals)
    total, weight = (float(x) for x in jax.device_get(totals))
    return total / max(weight, 1.0)

  def _validation_batches(self, full: bool):
    windows = self._subset_windows()
    if full or not windows:
      return (self._global(batch, self.eval_batch_size) for batch in self._eval_batches)
    if self._eval_subset is None:
      subset = self._eval_batches.subset(windows, self.tc.seed)
      self._eval_subset = [self._global(batch, self.eval_batch_size) for batch in subset]
    return self._eval_subset

  def _subset_windows(self) -> int:
    """train.eval_windows when the validation split has more windows, else 0 (evaluations read all)."""
    if self._eval_batches is None:
      self._eval_batches = self.data.eval_batches()
    windows = int(self.tc.get("eval_windows", 0) or 0)
    return windows if 0 < windows < self._eval_batches.windows else 0

  def _meta(self, step: int) -> Dict[str, Any]:
    return {"step": step, "model": self.model_dict, "data_position": self.data_position,
            "opt": self.config.opt.to_dict(), **self.run_meta}

  def save(self, step: int) -> None:
    self._check_nonfinite()
    try:  # also reports a failure of the previous, asynchronous save
      self.checkpointer.save(step, self.state, self._meta(step))
      self._write_config(step)
    except (ckpt_lib.NonFiniteState, KeyboardInterrupt):
      raise
    except Exception as e:  # noqa: BLE001: Orbax and tensorstore raise many kinds
      raise CheckpointWriteFailed(f"saving checkpoint {step} in {self.workdir} failed") from e

  def _log(self, text: str) -> None:
    if self.primary:
      _log_line(self.progress, text)

  def _check_nonfinite(self) -> int:
    """Reads the non-finite flags of the steps since the last check (their updates were already dropped on the
    device) and applies train.on_nonfinite: 'stop' raises, 'skip' reports. Returns how many steps were bad."""
    if not self._unchecked_flags:
      return 0
    flags = [(step, int(flag)) for step, flag in self._unchecked_flags]  # one device sync
    self._unchecked_flags = []
    bad = [step for step, flag in flags if flag]
    if not bad:
      return 0
    self.run_meta["skipped_updates"] = self.run_meta.get("skipped_updates", 0) + len(bad)
    if self.tc.on_nonfinite == "stop":
      raise NonFiniteLoss(f"the loss or gradient was NaN/Inf at step {bad[0]}" +
                          (f" and {len(bad) - 1} later step(s)" if len(bad) > 1 else "") +
                          "; those updates were dropped and nothing after them was saved (the last checkpoint is "
                          "intact). Lower opt.lr, keep opt.clip_norm > 0, check the data, or set "
                          "train.on_nonfinite=skip to train on")
    self._log(f"warning: skipped {len(bad)} update(s) with a NaN/Inf loss or gradient (steps {bad[:5]}"
              f"{'...' if len(bad) > 5 else ''})")
    return len(bad)

  def _train_row(self, step: int, window_losses, window_steps: int, elapsed: float, step_metrics) -> Dict[str, Any]:
    losses = [float(x) for x in window_losses]  # one device sync per log interval
    skipped = self._check_nonfinite()
    finite = [l for l in losses if math.isfinite(l)]
    row = {"step": step, "loss": float(np.mean(finite)) if finite else float("nan"),
           "tokens_per_sec": window_steps * self.tc.batch_size * self.tc.seq_len / elapsed,
           "lr": float(self.schedule(step - 1)), "elapsed_s": time.perf_counter() - self.run_start,
           **{k: float(v) for k, v in step_metrics.items() if k not in ("loss", "nonfinite")}}
    if self.flops_per_token:
      row["tflops_per_device"] = self.flops_per_token * row["tokens_per_sec"] / jax.device_count() / 1e12
      if self.peak_tflops:
        row["mfu"] = row["tflops_per_device"] / self.peak_tflops
    if skipped:
      row["skipped_updates"] = skipped
    return row

  def _evaluate_once(self, step: int, writer, full: bool) -> float:
    eval_loss = self.evaluate(self.state.params, full)
    if not math.isfinite(eval_loss) and self.tc.on_nonfinite == "stop":
      raise NonFiniteLoss(f"the validation loss is {eval_loss} at step {step} (the parameters are finite); nothing "
                          "after the last checkpoint was saved. Lower opt.lr, or set train.on_nonfinite=skip")
    split = "whole split" if full else f"{self.tc.eval_windows} windows"
    if writer is not None:
      writer.write({"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0)),
                    "eval_full": full, "elapsed_s": time.perf_counter() - self.run_start, "time": time.time()})
    self.run_meta["eval_history"].append([step, eval_loss])
    self._log(f"step {step}: eval loss {eval_loss:.4f} (ppl {math.exp(min(eval_loss, 50)):.2f}, {split})")
    return eval_loss

  def _evaluate_and_track(self, step: int, writer) -> bool:
    """Evaluates (a subset of the validation windows during training, see train.eval_windows; the whole split at
    the last step and to confirm train.target_eval_loss), records, saves the best parameters; returns whether
    to stop (early stopping, or the target reached)."""
    self._check_nonfinite()
    full = step >= self.tc.steps or not self._subset_windows()
    eval_loss = self._evaluate_once(step, writer, full)
    target = float(self.tc.get("target_eval_loss", 0.0) or 0.0)
    if target and eval_loss <= target and not full:
      full, eval_loss = True, self._evaluate_once(step, writer, True)
    reached = bool(target) and full and eval_loss <= target
    if reached:
      self.run_meta["target_reached_step"] = step
      self._log(f"validation loss {eval_loss:.4f} <= train.target_eval_loss={target} on the whole split at step "
                f"{step}: stopping")
    if eval_loss < self.run_meta["best_eval_loss"]:  # never true for NaN
      self.run_meta.update(best_eval_loss=eval_loss, bad_evals=0)
      self.checkpointer.save_best(step, self.state, self._meta(step))
      return reached
    self.run_meta["bad_evals"] += 1
    if self.tc.patience and self.run_meta["bad_evals"] >= self.tc.patience:
      self._log(f"early stopping: no improvement in {self.tc.patience} evaluations")
      return True
    return reached

  def run(self, stop_after_steps: Optional[int] = None) -> TrainResult:
    """Trains to `train.steps` (or early stopping, or a stop request). `stop_after_steps` stops (saving) after
    that many steps of this call, as an interruption would; it exists for resume tests."""
    tc = self.tc
    log.info("model %s: %s parameters | mesh %s | %d process(es) | %d train / %d validation tokens | vocab %d",
             self.model_dict.get("family") or self.model_dict["arch"], f"{self.n_params:,}", dict(self.mesh.shape),
             jax.process_count(), self.data.train_tokens, self.data.val_tokens, self.model_dict["vocab_size"])
    writer = metrics_lib.MetricsWriter(self.workdir, resume_step=self.start_step) if self.primary else None
    end_step = tc.steps if stop_after_steps is None else min(tc.steps, self.start_step + stop_after_steps)
    self.progress = _progress_bar(tc, self.start_step) if self.primary else None
    step, last_loss, stopped_early, interrupted = self.start_step, float("nan"), False, False
    window_start, window_steps, window_losses, window_paused = time.perf_counter(), 0, [], 0.0
    vote = distributed.StopVote()
    run_ahead = _RunAhead()
    if self._placed is None:
      self._placed = self._placed_batches()

    try:
      with _StopRequest() as stop:
        while step < end_step:
          batch = next(self._placed)
          self.state, step_metrics = self.step_fn(self.state, batch, self.base_rng)
          run_ahead.dispatched(step_metrics["loss"])
          step += 1
          self.data_position += 1
          window_steps += 1
          window_losses.append(step_metrics["loss"])
          self._unchecked_flags.append((step, step_metrics["nonfinite"]))
          if self.progress is not None:
            self.progress.update(1)
          interrupted = vote.vote(stop.requested)  # the same answer, at the same step, on every process

          if step % tc.log_every == 0 or step == end_step:
            # The window ends when its last step has run, not when it was dispatched (tokens/s and MFU).
            jax.block_until_ready(step_metrics["loss"])
            row = self._train_row(step, window_losses, window_steps,
                                  time.perf_counter() - window_start - window_paused, step_metrics)
            last_loss = float(window_losses[-1])
            if writer is not None:
              writer.write(row)
            mfu = {"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}
            if self.progress is not None:
              self.progress.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_sec']:,.0f}", **mfu)
            elif self.primary:
              log.info("step %d loss %.4f tokens/s %.0f%s", step, row["loss"], row["tokens_per_sec"],
                       f" MFU {mfu['mfu']}" if mfu else "")
            window_start, window_steps, window_losses, window_paused = time.perf_counter(), 0, [], 0.0

          if auto_grow.due(step, self._chars_per_step(), tc.get("grow_every_chars", 0)) and step < end_step:
            self._grow(step)  # every process, after the same step

          if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
            # The steps dispatched so far finish first: the pause must hold the evaluation's time only.
            jax.block_until_ready(step_metrics["loss"])
            paused = time.perf_counter()
            stopped_early = self._evaluate_and_track(step, writer)
            window_paused += time.perf_counter() - paused  # evaluation time is not training throughput

          if tc.get("sample_every") and tc.sample_tokens and step % tc.sample_every == 0 and step < tc.steps:
            self._sample(step, writer)  # every process: the parameters may have to be gathered

          if step % tc.save_every == 0 or step == end_step or stopped_early or interrupted:
            self.save(step)
          if stopped_early or interrupted:
            break
    finally:
      if self.progress is not None:
        self.progress.close()
      self.close()  # waits for the saves in flight, releases the workdir
      if writer is not None:
        writer.close()
        metrics_path = fs.join(self.workdir, "metrics.jsonl")
        if fs.exists(metrics_path):
          metrics_lib.plot_loss_curve(metrics_path, fs.join(self.workdir, "loss_curve.png"))
    if interrupted:  # every process says it, so each host's log shows where the run stopped
      log.warning("stopped on request after step %d (process %d); checkpoint saved, rerun the same command to "
                  "resume", step, jax.process_index())

    if interrupted and start_choice.after_interrupt(primary=self.primary) == "stop":
      interrupted, stopped_early = False, True  # saved; the stage is recorded as finished
      self._log(f"stopped at step {step}: this stage is recorded as finished")
    sample = None
    finished = step >= tc.steps or stopped_early
    self._write_config(step, finished=finished and not interrupted)
    if finished and tc.sample_tokens and not interrupted:
      sample = self._sample()
    return TrainResult(step=step, last_loss=last_loss, best_eval_loss=self.run_meta["best_eval_loss"],
                       eval_history=self.run_meta["eval_history"], stopped_early=stopped_early,
                       interrupted=interrupted, sample=sample)

  def close(self) -> None:
    """Finishes the checkpoint writes in flight and releases the workdir (also when a write fails); safe to call
    twice."""
    checkpointer, self.checkpointer = self.checkpointer, None
    try:
      if checkpointer is not None:
        try:
          checkpointer.close()
        except Exception as e:  # noqa: BLE001
          raise CheckpointWriteFailed(f"finishing the checkpoint writes in {self.workdir} failed") from e
    finally:
      if self.lock is not None:
        self.lock.release()
        self.lock = None

  def _sample(self, step: Optional[int] = None, writer=None) -> Optional[str]:
    """A short generation from the current parameters, printed (and, during training, logged to metrics.jsonl
    as {"step", "sample"}) by the primary. Every process must call it."""
    if jax.process_count() > 1:  # every process takes part in gathering the sharded parameters
      from jax.experimental import multihost_utils
      params = multihost_utils.process_allgather(self.state.params, tiled=True)
    else:
      params = jax.device_get(self.state.params)
    if not self.primary:
      return None
    tc = self.tc
    sample = _sample(self.module, params, self.data.tokenizer, tc, self.model_cfg)
    at = "" if step is None else f" at step {step}"
    text = (f"----- sample{at} ({tc.sample_tokens} tokens, temperature {tc.sample_temperature}) -----\n"
            f"{sample}\n-----")
    if step is None:
      print("\n" + text, flush=True)
    else:
      self._log(text)  # above the progress bar
      if writer is not None:
        writer.write({"step": step, "sample": sample})
    return sample


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after_steps: Optional[int] = None) -> TrainResult:
  """Trains `config` in `workdir` (see Trainer). `stop_after_steps` stops (saving) after that many steps of this
  call, as an interruption would; it exists for resume tests."""
  return Trainer(config, workdir).run(stop_after_steps)


def data_lib_tokenizer(directory):
  from jaxlm.data import tokenizers
  return tokenizers.load_tokenizer(directory)


def _host_tree(tree):
  """`tree`'s arrays as numpy on every process (gathered across processes when sharded over them)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def _chars_per_token(data, tokenizer) -> Optional[float]:
  """Characters per token of the first validation batch (history's `chars` of subword tokenizers)."""
  try:
    first = next(iter(data.eval_batches()))  # read lazily: only the first batch
    ids = np.asarray(first["inputs"]).reshape(-1)[:4096].tolist()
    return len(tokenizer.decode(ids)) / max(len(ids), 1)
  except Exception:  # noqa: BLE001: an estimate for the record, never a reason to stop training
    return None


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
  from jaxlm.models import layout
  if getattr(model_cfg, "scan_layers", False):  # generation runs on the per-block layout
    model_dict, params = layout.to_per_block(model_cfg.to_dict(), params)
    model_cfg, module = build_model(model_dict)
  prompt = tokenizer.encode(tc.sample_prompt) or [0]
  new = sample_ids(module, params, prompt, tc.sample_tokens, context=min(tc.seq_len, model_cfg.max_seq_len),
                   temperature=tc.sample_temperature, seed=tc.seed)
  return tokenizer.decode(list(prompt) + new)
