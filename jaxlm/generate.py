"""Autoregressive generation: a jitted prefill and a jitted decode loop, with a KV cache or by full recompute.

  python -m jaxlm.generate --checkpoint DIR (--prompt "text" | --prompt-ids 1,2,3)... --max-new-tokens N
      [--temperature 0] [--top-k K] [--top-p P] [--repetition-penalty R --penalty-style sign|divide]
      [--seed S] [--stop-ids 2,3|none] [--context C] [--decode auto|cache|recompute] [--stream]
      [--mode fast|normal|deep|extreme --n-cycles N --t-steps T] [--which latest|best] [--print-ids] [--verbose]

--checkpoint is a model directory (python -m convert torch2jax writes one) or a training workdir. `--prompt`
text goes through the model's own tokenizer; `--prompt-ids` gives token ids. Either may repeat: the prompts
then decode together as one batch (right-padded; each row keeps its own positions). Temperature 0 is greedy.
Prints each completion's text; `--print-ids` adds the new token ids, space-separated, one line per prompt, as
the last line(s) of stdout. Timing goes to stderr.

How a model decodes follows from its config, not its family: a causal model whose config has a
`kv_cache_layout` (jaxlm.kv_cache) prefills its prompt once and then runs one token per step against the
cache; any other model (the non-causal imported YingGem and HRM checkpoints, HRM-Text1) recomputes the whole
window every step, as the originals do, which keeps their tokens identical to the originals'. Both run as
one compiled `lax.while_loop` with static shapes; prompt and output lengths are rounded up to buckets so a
chat compiles a handful of shapes, not one per turn. The context (default model.max_seq_len) bounds what a
step sees: a longer prompt keeps its last `context` tokens, and past it recompute slides its window while
the cache keeps the last `context` positions.

Before anything is allocated, a generation is checked against what it can address (at most 2^24 positions,
prompt included) and against memory (its buffers, `decode_bytes`, must fit in half the free device or host
memory); either failure is one line naming what to lower. Ctrl-C stops the loop within a few tokens. Errors
are one line on stderr (the traceback with --verbose or JAXLM_VERBOSE=1); exit codes as in jaxlm.errors:
0 done, 1 a failure while running, 2 bad input, 130 Ctrl-C.

Sampling and its order of operations: jaxlm.sampling.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import os
import signal
import sys
import time
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxlm import errors, gen_defaults, kv_cache, validate
from jaxlm.models import apply_reasoning
from jaxlm.sampling import Sampling, Stages, choose, token_counts

STRATEGIES = ("auto", "cache", "recompute")
FILL = -1  # output slot of a row that has finished
# One generation addresses at most 2^24 positions, prompt included: the cache path feeds absolute positions to
# float32 rotary angles, exact integers only up to 2^24. Full recompute (positions stay inside its window) gets
# the same limit, so that one number bounds every output buffer (one int32 per token: 64 MiB per prompt).
MAX_POSITIONS = 2 ** 24
MEMORY_FRACTION = 0.5  # decode buffers may take this share of the free device (or host) memory

# A listener sees each step's tokens as they are chosen: listener(tokens [B], step, finished [B]) and may
# return a bool array [B] (or one bool) asking rows to stop after this token (safety filter, "natural" stop).
Listener = Callable[[np.ndarray, int, np.ndarray], Any]
# A stop check (e.g. "was Ctrl-C pressed?") is asked every STOP_CHECK_EVERY tokens, without a listener's cost of
# one host callback per token; True stops every row.
StopCheck = Callable[[], bool]
STOP_CHECK_EVERY = 32


def _bucket(n: int, floor: int = 8) -> int:
  """Next power of two >= n (at least `floor`): few distinct static shapes."""
  size = floor
  while size < n:
    size *= 2
  return size


class _Relay:
  """A stable host-callback target (part of the jit cache key) that forwards to the current listener."""

  def __init__(self):
    self.listener: Optional[Listener] = None

  def __call__(self, tokens, step, finished):
    tokens, finished = np.asarray(tokens), np.asarray(finished)
    stop = self.listener(tokens, int(step), finished) if self.listener is not None else None
    return np.broadcast_to(np.asarray(bool(stop) if np.ndim(stop) == 0 else stop, bool),
                           tokens.shape).copy()


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The static part of one compiled decode: shapes, stages, stop ids and the decoding path."""
  module: Any
  use_cache: bool
  batch: int
  prompt_len: int       # padded prompt length
  max_new: int          # output buffer length (a bucket >= the requested count)
  window_len: int       # recompute: tokens per forward; cache: slots of a full-attention layer
  stages: Stages
  stop_ids: Tuple[int, ...]
  relay: Optional[_Relay]
  relay_every: int = 1  # the relay is asked at steps that are multiples of this


# -------------------------------------------------------------------------------------- the two paths
def _cached_start(plan: _Plan, params, prompt_BxP, lengths_B):
  b, p = prompt_BxP.shape
  cache = kv_cache.init_cache(plan.module.config, b, plan.window_len)
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  valid = positions < lengths_B[:, None]
  logits, cache = plan.module.apply({"params": params}, prompt_BxP, padding_mask_BxT=valid,
                                    positions_BxT=positions, cache=cache, logits_at_B=lengths_B - 1)
  return logits[:, 0], (cache, lengths_B)


def _cached_advance(plan: _Plan, params, state, tokens_B):
  cache, next_pos_B = state
  logits, cache = plan.module.apply({"params": params}, tokens_B[:, None], positions_BxT=next_pos_B[:, None],
                                    cache=cache)
  return logits[:, 0], (cache, next_pos_B + 1)


def _accepts(module, keyword: str) -> bool:
  return keyword in inspect.signature(type(module).__call__).parameters


def _window_logits(plan: _Plan, params, buf_BxL, lens_B):
  """Full forward over the window, right padding masked as keys; logits at each row's last real token."""
  valid = jnp.arange(buf_BxL.shape[1])[None, :] < lens_B[:, None]
  if _accepts(plan.module, "logits_at_B"):  # skip the head (large for big vocabularies) at other positions
    logits = plan.module.apply({"params": params}, buf_BxL, padding_mask_BxT=valid, logits_at_B=lens_B - 1)
    return logits[:, 0]
  logits = plan.module.apply({"params": params}, buf_BxL, padding_mask_BxT=valid)
  return jnp.take_along_axis(logits, (lens_B - 1)[:, None, None], axis=1)[:, 0]


def _recompute_start(plan: _Plan, params, prompt_BxP, lengths_B):
  b, p = prompt_BxP.shape
  buf = jnp.zeros((b, plan.window_len), jnp.int32).at[:, :p].set(prompt_BxP)
  return _window_logits(plan, params, buf, lengths_B), (buf, lengths_B)


def _recompute_advance(plan: _Plan, params, state, tokens_B):
  buf, lens_B = state
  width = buf.shape[1]
  rows = jnp.arange(buf.shape[0])
  appended = buf.at[rows, jnp.minimum(lens_B, width - 1)].set(tokens_B)
  slid = jnp.concatenate([buf[:, 1:], tokens_B[:, None]], axis=1)  # a full window drops its oldest token
  buf = jnp.where((lens_B >= width)[:, None], slid, appended)
  lens_B = jnp.minimum(lens_B + 1, width)
  return _window_logits(plan, params, buf, lens_B), (buf, lens_B)


# -------------------------------------------------------------------------------------- the loop
@functools.partial(jax.jit, static_argnames=("plan",))
def _decode(params, prompt_BxP, lengths_B, counts_BxV, max_new, values, key, *, plan: _Plan):
  """-> (tokens [B, max_new] with FILL after a row ends, finish code [B]: 0 length, 1 stop id, 2 halted)."""
  start, advance = ((_cached_start, _cached_advance) if plan.use_cache
                    else (_recompute_start, _recompute_advance))
  b = prompt_BxP.shape[0]
  stop_ids = jnp.asarray(plan.stop_ids or (-2,), jnp.int32)

  def pick(logits, counts, finished, step):
    """Choose, record and report one token per row; returns (tokens, counts, finish code)."""
    tokens = choose(logits, counts, values, plan.stages, key, step)
    if plan.stages.penalty:
      counts = counts.at[jnp.arange(b), tokens].add(jnp.where(finished > 0, 0, 1))
    code = jnp.where(jnp.isin(tokens, stop_ids), 1, 0)
    if plan.relay is not None:
      ask = lambda: io_callback(plan.relay, jax.ShapeDtypeStruct((b,), jnp.bool_), tokens, step, finished > 0,
                                ordered=True)
      halt = ask() if plan.relay_every == 1 else jax.lax.cond(step % plan.relay_every == 0, ask,
                                                              lambda: jnp.zeros((b,), jnp.bool_))
      code = jnp.where((code == 0) & halt, 2, code)
    return tokens, counts, jnp.where(finished > 0, finished, code)

  logits, state = start(plan, params, prompt_BxP, lengths_B)
  no_finish = jnp.zeros((b,), jnp.int32)
  tokens, counts, finished = pick(logits, counts_BxV, no_finish, jnp.int32(0))
  out = jnp.full((b, plan.max_new), FILL, jnp.int32).at[:, 0].set(tokens)

  def cond(carry):
    step, _, _, _, _, finished = carry
    return (step < max_new) & jnp.any(finished == 0)

  def body(carry):
    step, tokens, state, out, counts, finished = carry
    logits, state = advance(plan, params, state, tokens)
    new, counts, now = pick(logits, counts, finished, step)
    out = out.at[:, step].set(jnp.where(finished > 0, FILL, new))
    return step + 1, new, state, out, counts, now

  carry = (jnp.int32(1), tokens, state, out, counts, finished)
  _, _, _, out, _, finished = jax.lax.while_loop(cond, body, carry)
  return out, finished


# -------------------------------------------------------------------------------------- sizes
def decode_bytes(plan: _Plan, vocab_size: int) -> dict:
  """Bytes of the largest buffers one compiled decode allocates, by name (an estimate: what grows with the
  batch, the output length, the context and the vocabulary; activations of width d_model are left out)."""
  config, b = plan.module.config, plan.batch
  heads = int(getattr(config, "n_heads", 1))
  sizes = {"output ids": b * plan.max_new * 4}
  if plan.use_cache:
    itemsize = jnp.dtype(getattr(config, "dtype", "float32")).itemsize
    slots = [min(w, plan.window_len) if w else plan.window_len for _, _, w in config.kv_cache_layout]
    sizes["KV cache"] = sum(b * s * (2 * k * h * itemsize + 4) for s, (k, h, _) in zip(slots, config.kv_cache_layout))
    sizes["attention scores"] = b * heads * plan.prompt_len * (max(slots) + plan.prompt_len) * 4  # the prefill
    logit_rows = 1
  else:
    sizes["token window"] = b * plan.window_len * 4
    sizes["attention scores"] = b * heads * plan.window_len ** 2 * 4
    logit_rows = 1 if _accepts(plan.module, "logits_at_B") else plan.window_len
  sizes["logits"] = b * logit_rows * vocab_size * 4
  if plan.stages.penalty:
    sizes["repetition counts"] = b * vocab_size * 4
  return sizes


def memory_budget() -> Optional[Tuple[int, str]]:
  """(bytes the decode buffers may take, where that comes from), or None when the free memory is unknown."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if "bytes_limit" in stats:
    free, where = stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"free {device.platform} memory"
  else:
    free, where = _host_available_bytes(), "free host memory"
  if free is None:
    return None
  return int(free * MEMORY_FRACTION), f"{MEMORY_FRACTION:.0%} of the {_human(free)} of {where}"


def _host_available_bytes() -> Optional[int]:
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (AttributeError, ValueError, OSError):
    return None


def _human(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if n < 1000 or unit == "TB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1000


def _check_positions(longest_prompt: int, max_new_tokens: int) -> None:
  if longest_prompt + max_new_tokens > MAX_POSITIONS:
    raise ValueError(
        f"max_new_tokens={max_new_tokens:,} with a {longest_prompt:,}-token prompt passes the last position a "
        f"generation addresses ({MAX_POSITIONS:,} = 2^24, prompt included); lower --max-new-tokens to at most "
        f"{MAX_POSITIONS - longest_prompt:,}")


def _check_memory(plan_for: Callable[[int], _Plan], max_new: int, vocab_size: int, n_prompts: int) -> None:
  """Refuses, before anything is allocated, a decode whose buffers would not fit in the memory budget.
  `plan_for(m)` is the plan with an output buffer of m tokens."""
  budget = memory_budget()
  if budget is None:
    return
  limit, where = budget
  plan = plan_for(max_new)
  sizes = decode_bytes(plan, vocab_size)
  if sum(sizes.values()) <= limit:
    return
  parts = ", ".join(f"{name} {_human(n)}" for name, n in sorted(sizes.items(), key=lambda kv: -kv[1]))
  fits = max_new // 2
  while fits >= 16 and sum(decode_bytes(plan_for(fits), vocab_size).values()) > limit:
    fits //= 2
  advice = (f"lower --max-new-tokens (at most {fits:,} fit), --context or the number of prompts" if fits >= 16
            else "lower --context or the number of prompts (even 16 new tokens do not fit)")
  raise ValueError(f"decoding {n_prompts} prompt(s) with a {plan.window_len:,}-token window and room for "
                   f"{plan.max_new:,} new tokens needs about {_human(sum(sizes.values()))} ({parts}), more than "
                   f"the {_human(limit)} allowed ({where}); {advice}")


# -------------------------------------------------------------------------------------- public API
class Output(NamedTuple):
  tokens: List[List[int]]     # new tokens per prompt (a stop id that ended a row is not included)
  finish: List[str]           # per prompt: 'length', 'stop' (a stop id) or 'halt' (the listener asked)
  seconds: float              # wall time of the call (compilation included the first time a shape is seen)
  strategy: str               # 'cache' or 'recompute'
  compiled: bool = False      # this call compiled a new decode loop (its time includes that)


_FINISH = {0: "length", 1: "stop", 2: "halt"}


def decoding_strategy(config: Any, requested: str = "auto") -> str:
  """'cache' for causal models with a cache layout, else 'recompute'; 'cache' on others is an error."""
  if requested not in STRATEGIES:
    raise ValueError(f"decoding strategy must be one of {STRATEGIES}, got {requested!r}")
  cacheable = kv_cache.supports_cache(config)
  if requested == "cache" and not cacheable:
    raise ValueError(f"model arch {getattr(config, 'arch', '?')!r} (causal={getattr(config, 'causal', None)}) "
                     "cannot decode with a KV cache; use full recompute")
  if requested == "auto":
    return "cache" if cacheable else "recompute"
  return requested


class Generator:
  """A model bound to the decoding machinery. Compiled loops are cached per static shape (jax.jit)."""

  def __init__(self, module, params, *, context: Optional[int] = None, strategy: str = "auto"):
    self.module = module
    self.params = params
    self.config = module.config
    self.strategy = decoding_strategy(self.config, strategy)
    limit = int(getattr(self.config, "max_seq_len", 0) or 0)
    self.context = int(context or limit or 1024)
    if self.context <= 1:
      raise ValueError(f"the context must hold at least 2 tokens, got {self.context}")
    self.vocab_size = int(self.config.vocab_size)
    self._relay = _Relay()

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
               sampling: Sampling = Sampling(), stop_ids: Sequence[int] = (), seed: int = 0,
               listener: Optional[Listener] = None, stop_check: Optional[StopCheck] = None) -> Output:
    """New tokens for each prompt. `listener` sees every token; `stop_check` is asked every STOP_CHECK_EVERY
    tokens (with every token when there is a listener) and True ends every row ('halt')."""
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(not p for p in prompts):
      raise ValueError("every prompt needs at least one token")
    for p in prompts:
      bad = [t for t in p if not 0 <= t < self.vocab_size]
      if bad:
        raise ValueError(f"prompt token {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
    if max_new_tokens <= 0:
      return Output([[] for _ in prompts], ["length"] * len(prompts), 0.0, self.strategy)
    started = time.perf_counter()
    windows = [p[-self.context:] for p in prompts]
    lengths = np.array([len(w) for w in windows], np.int32)
    _check_positions(int(lengths.max()), max_new_tokens)
    prompt_len = min(_bucket(int(lengths.max())), self.context)
    max_new = _bucket(max_new_tokens, 16)
    stages = sampling.stages()
    plan_for = functools.partial(
        self._plan, batch=len(prompts), prompt_len=prompt_len, stages=stages,
        stop_ids=tuple(sorted(set(int(i) for i in stop_ids))), **_relay_fields(self._relay, listener, stop_check))
    _check_memory(plan_for, max_new, self.vocab_size, len(prompts))
    plan = plan_for(max_new)
    batch = np.zeros((len(windows), prompt_len), np.int32)
    for row, w in enumerate(windows):
      batch[row, :len(w)] = w
    counts = jnp.asarray(token_counts(prompts, self.vocab_size)) if stages.penalty else None
    self._relay.listener = _with_stop_check(listener, stop_check)
    cached_loops = _compiled_loops()
    try:
      out, finished = _decode(self.params, jnp.asarray(batch), jnp.asarray(lengths), counts,
                              jnp.int32(max_new_tokens), sampling.values(), jax.random.key(seed), plan=plan)
      out, finished = np.asarray(out), np.asarray(finished)
    finally:
      self._relay.listener = None
    tokens, finish = [], []
    for row in range(len(prompts)):
      ids = [int(t) for t in out[row, :max_new_tokens] if t != FILL]
      reason = _FINISH[int(finished[row])]
      if reason == "stop":
        ids = ids[:-1]
      tokens.append(ids)
      finish.append(reason)
    return Output(tokens, finish, time.perf_counter() - started, self.strategy, _compiled_loops() > cached_loops)

  def _plan(self, max_new: int, *, prompt_len: int, **fields) -> _Plan:
    """The decode's static plan for an output buffer of `max_new` tokens."""
    return _Plan(module=self.module, use_cache=self.strategy == "cache", prompt_len=prompt_len, max_new=max_new,
                 window_len=min(prompt_len + max_new, self.context), **fields)


def _relay_fields(relay: _Relay, listener: Optional[Listener], stop_check: Optional[StopCheck]) -> dict:
  if listener is None and stop_check is None:
    return {"relay": None}
  return {"relay": relay, "relay_every": 1 if listener is not None else STOP_CHECK_EVERY}


def _with_stop_check(listener: Optional[Listener], stop_check: Optional[StopCheck]) -> Optional[Listener]:
  if stop_check is None:
    return listener

  def combined(tokens, step, finished):
    stop = listener(tokens, step, finished) if listener is not None else None
    return np.asarray(False if stop is None else stop, bool) | bool(stop_check())
  return combined


def _compiled_loops() -> int:
  size = getattr(_decode, "_cache_size", None)  # a private jax API: only used to label timings
  return size() if callable(size) else 0


def generate(module, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             sampling: Sampling = Sampling(), stop_ids: Sequence[int] = (), seed: int = 0,
             context: Optional[int] = None, strategy: str = "auto",
             listener: Optional[Listener] = None, stop_check: Optional[StopCheck] = None) -> Output:
  """One-shot form of Generator(...).generate(...)."""
  return Generator(module, params, context=context, strategy=strategy).generate(
      prompts, max_new_tokens, sampling=sampling, stop_ids=stop_ids, seed=seed, listener=listener,
      stop_check=stop_check)


def sample_ids(module, params, prompt_ids: List[int], max_new_tokens: int, *, context: int,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               on_token: Optional[Callable[[int], None]] = None) -> List[int]:
  """The trainer's sampler: new token ids for one prompt (no stop ids); temperature 0 is greedy."""
  listener = None if on_token is None else (lambda tokens, step, finished: on_token(int(tokens[0])))
  out = generate(module, params, [prompt_ids], max_new_tokens, context=context, seed=seed, listener=listener,
                 sampling=Sampling(temperature=temperature, top_k=top_k, top_p=top_p))
  return out.tokens[0]


# -------------------------------------------------------------------------------------- loading
class Model(NamedTuple):
  config: Any
  module: Any
  params: Any
  tokenizer: Any            # a jaxlm.data.tokenizers.Tokenizer, or None
  path: str
  model_dict: dict          # config.json "model" as written (keeps "family")
  source: dict              # model directory: where it was converted from; {} for a training workdir
  run_config: dict          # training workdir: the run's config (data section etc.); {} otherwise
  tokenizer_error: str = "" # why `tokenizer` is None, when the model has one that did not load
  generation: dict = {}     # the model's generation defaults (jaxlm.gen_defaults), used where no flag is given


def load(checkpoint: str, which: str = "latest", mode=None, n_cycles=None, t_steps=None) -> Model:
  """A model directory or training workdir, ready to decode (with its tokenizer when it has one)."""
  from jaxlm import modeldir
  from jaxlm.data.tokenizers import load_tokenizer
  from jaxlm.models import build_model
  loaded = modeldir.load(checkpoint, which)
  config, module = build_model(loaded.model_dict)
  config, module = apply_reasoning(config, module, mode, n_cycles, t_steps)
  tokenizer, tokenizer_error = None, "the model has no tokenizer"
  if loaded.tokenizer_dir:
    try:  # token ids still work without one (--prompt-ids)
      tokenizer, tokenizer_error = load_tokenizer(loaded.tokenizer_dir), ""
    except (FileNotFoundError, ValueError) as e:
      tokenizer_error = f"its tokenizer did not load: {e}"
  run_config, generation = {}, gen_defaults.for_family(loaded.model_dict.get("family", ""))
  try:
    written = modeldir.read_config(checkpoint)
    generation = gen_defaults.from_config(written)
    if modeldir.is_workdir(checkpoint):
      run_config = written.get("config") or {}
  except (FileNotFoundError, ValueError):
    pass  # an older workdir without config.json: its family's defaults; the status line loses its data section
  return Model(config, module, jax.tree.map(jnp.asarray, loaded.params), tokenizer, checkpoint,
               dict(loaded.model_dict), dict(loaded.source), run_config, tokenizer_error, generation)


def default_stop_ids(tokenizer) -> List[int]:
  eos = getattr(tokenizer, "eos_id", None)
  return [] if eos is None else [int(eos)]


class TextStream:
  """Turns a growing list of ids into printable text increments (holds back a split UTF-8 character)."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.ids: List[int] = []
    self.shown = 0

  def text(self) -> str:
    return self.tokenizer.decode(self.ids) if self.tokenizer is not None else " ".join(map(str, self.ids))

  def push(self, token: int) -> str:
    self.ids.append(int(token))
    text = self.text()
    if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for the next token
      return ""
    new, self.shown = text[self.shown:], len(text)
    return new


# -------------------------------------------------------------------------------------- Ctrl-C
class StopOnInterrupt:
  """Ctrl-C while decoding ends the loop within STOP_CHECK_EVERY tokens instead of being lost.

  A compiled loop never sees KeyboardInterrupt: Python runs signal handlers on the main thread only, which
  waits inside XLA until the loop returns (and a KeyboardInterrupt raised in a listener's host callback turns
  into a runtime error). So during the block SIGINT is also written to a pipe (signal.set_wakeup_fd, which the
  interpreter does at once, from whichever thread the signal lands on), and the loop's stop check reads it:
  `with StopOnInterrupt() as stop: generator.generate(..., stop_check=stop)`. Leaving the block after a Ctrl-C
  raises KeyboardInterrupt (with raise_after=False, `stop.requested` tells instead).
  """

  def __init__(self, raise_after: bool = True):
    self.raise_after = raise_after
    self.requested = False
    self._previous = None
    self._pipe = None
    self._previous_fd = -1

  def __call__(self) -> bool:
    if not self.requested and self._pipe is not None:
      try:
        self.requested = signal.SIGINT in os.read(self._pipe[0], 512)
      except BlockingIOError:  # nothing written: no signal yet
        pass
    return self.requested

  def __enter__(self) -> "StopOnInterrupt":
    self.requested = False
    try:
      self._previous = signal.signal(signal.SIGINT, self._handle)
    except ValueError:  # not the main thread: Ctrl-C stays with the caller
      self._previous = None
      return self
    self._pipe = os.pipe()
    for fd in self._pipe:
      os.set_blocking(fd, False)
    self._previous_fd = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
    return self

  def __exit__(self, exc_type, exc, tb) -> bool:
    if self._previous is not None:
      self()  # a signal still in the pipe counts
      signal.set_wakeup_fd(self._previous_fd)
      signal.signal(signal.SIGINT, self._previous)
      for fd in self._pipe:
        os.close(fd)
      self._previous, self._pipe = None, None
    if self.requested and self.raise_after and exc_type is None:
      raise KeyboardInterrupt
    return False

  def _handle(self, signum, frame) -> None:
    self.requested = True


# -------------------------------------------------------------------------------------- CLI
# Sampling flags (shared with jaxlm.chat): each value's range, checked before anything loads.
SAMPLING_ARGS = {
    "max_new_tokens": validate.integer(1, MAX_POSITIONS - 1, note="a generation addresses 2^24 positions"),
    "temperature": validate.number(0, note="0 = greedy"),
    "top_k": validate.integer(0, note="0 = off"),
    "top_p": validate.number(0, 1, note="1 = off, 0 = only the most likely token"),
    "repetition_penalty": validate.number(0, low_open=True, note="1 = off"),
    "seed": validate.SEED,
    "context": validate.integer(2, MAX_POSITIONS, special=((0, "model.max_seq_len"),)),
}
HRM_ARGS = {"n_cycles": validate.integer(1), "t_steps": validate.integer(1)}
SAMPLING_ARGS_GEN = {"repeat_stop": validate.integer(0, note="0 = off")}
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "penalty_style")
# jaxlm.generate's own defaults, for what neither a flag nor the model's stored generation defaults give.
BUILTIN = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "penalty_style": "sign",
           "max_new_tokens": 100, "repeat_stop": 0}


def _parse_ids(text: str) -> List[int]:
  fields = [f for f in text.replace(",", " ").split() if f]
  try:
    return [int(f) for f in fields]
  except ValueError:
    raise ValueError(f"--prompt-ids {text!r}: give integer ids like 1,2,3") from None


def _parse_stop(text: Optional[str]) -> Optional[List[int]]:
  """--stop-ids: None = the tokenizer's eos, 'none' = no stop ids, else the ids."""
  if text is None:
    return None
  return [] if text.strip().lower() == "none" else _parse_ids(text)


def build_parser() -> argparse.ArgumentParser:
  doc = __doc__.split("\n\n")
  parser = argparse.ArgumentParser(prog="python -m jaxlm.generate", description=doc[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n\n".join(doc[1:]))
  parser.add_argument("--checkpoint", required=True, help="model directory or training workdir")
  parser.add_argument("--which", choices=("latest", "best"), default="latest",
                      help="checkpoint of a training workdir (default latest)")
  parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
  parser.add_argument("--prompt-ids", action="append", default=[], help="prompt token ids, e.g. 1,2,3")
  # Sampling flags default to the model's stored generation defaults (jaxlm.gen_defaults), then to BUILTIN.
  parser.add_argument("--max-new-tokens", type=int, help="default: the model's, else 100")
  parser.add_argument("--temperature", type=float, help="0 = greedy (default: the model's, else 1.0)")
  parser.add_argument("--top-k", type=int, help="0 = off (default: the model's, else 0)")
  parser.add_argument("--top-p", type=float, help="1 = off (default: the model's, else 1)")
  parser.add_argument("--repetition-penalty", type=float, help="1 = off (default: the model's, else 1)")
  parser.add_argument("--penalty-style", choices=("sign", "divide"),
                      help="sign: CTRL/Hugging Face; divide: YingGem's logit / penalty^count (default: the model's, "
                           "else sign)")
  parser.add_argument("--repeat-stop", type=int,
                      help="stop a row after one token more than N times in a row; 0 = off (default: the model's: "
                           "10 for HRM, else 0)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--stop-ids", help="ids that end a completion (default: the tokenizer's eos; 'none')")
  parser.add_argument("--context", type=int, default=0, help="tokens a step sees (default model.max_seq_len)")
  parser.add_argument("--decode", choices=STRATEGIES, default="auto",
                      help="auto: KV cache for causal decoders, full recompute otherwise")
  parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                      help="print tokens as they come (default: when stdout is a terminal and one prompt)")
  parser.add_argument("--mode", help="HRM reasoning mode (fast, normal, deep, extreme)")
  parser.add_argument("--n-cycles", type=int, help="HRM: N high-level cycles")
  parser.add_argument("--t-steps", type=int, help="HRM: T low-level steps per cycle")
  parser.add_argument("--print-ids", action="store_true", help="print the new ids as the last line(s)")
  parser.add_argument("--verbose", action="store_true", help="print the traceback of an error (or JAXLM_VERBOSE=1)")
  return parser


def main(argv=None) -> int:
  """Exit codes (jaxlm.errors): 0 done, 1 a failure while running, 2 bad input, 130 Ctrl-C."""
  argv = sys.argv[1:] if argv is None else list(argv)
  return errors.run_command(lambda: _run(build_parser().parse_args(argv)), argv)


def _run(args) -> int:
  validate.check_args(args, {**SAMPLING_ARGS, **HRM_ARGS, **SAMPLING_ARGS_GEN})
  n_prompts = len(args.prompt) + len(args.prompt_ids)
  if not n_prompts:
    raise ValueError("give --prompt TEXT or --prompt-ids IDS")
  stream = args.stream if args.stream is not None else (sys.stdout.isatty() and n_prompts == 1)
  if stream and n_prompts != 1:
    raise ValueError("--stream prints one prompt's tokens; give a single prompt")
  id_prompts = [_parse_ids(t) for t in args.prompt_ids]
  stop_arg = _parse_stop(args.stop_ids)
  Sampling(**{k: v for k, v in vars(args).items() if k in SAMPLING_FIELDS and v is not None})  # flags first
  model = load(args.checkpoint, args.which, args.mode, args.n_cycles, args.t_steps)
  settings = gen_defaults.resolve(vars(args), model.generation, BUILTIN)
  sampling = Sampling(**{k: settings[k] for k in SAMPLING_FIELDS})
  if args.prompt and model.tokenizer is None:
    raise ValueError(f"--prompt needs a tokenizer and {model.tokenizer_error}; use --prompt-ids")
  prompts = [model.tokenizer.encode(text) for text in args.prompt] + id_prompts
  stop_ids = default_stop_ids(model.tokenizer) if stop_arg is None else stop_arg
  generator = Generator(model.module, model.params, context=args.context or None, strategy=args.decode)
  with StopOnInterrupt() as interrupted:
    listener = gen_defaults.combine(_printer(model.tokenizer, stop_ids) if stream else None,
                                    gen_defaults.repeat_stopper(settings["repeat_stop"]))
    out = generator.generate(prompts, settings["max_new_tokens"], sampling=sampling, stop_ids=stop_ids,
                             seed=args.seed, listener=listener, stop_check=interrupted)
  if stream:
    print()
  else:
    for ids in out.tokens:
      print(_decode_text(model.tokenizer, ids))
  n = sum(len(t) for t in out.tokens)
  print(f"[{n} new tokens in {out.seconds:.2f} s ({n / max(out.seconds, 1e-9):.1f} tokens/s"
        f"{', compilation included' if out.compiled else ''}), {out.strategy}, finish {','.join(out.finish)}]",
        file=sys.stderr)
  if args.print_ids:
    for ids in out.tokens:
      print(" ".join(map(str, ids)))
  return 0


def _printer(tokenizer, stop_ids) -> Listener:
  """A listener that writes row 0's text to stdout as tokens arrive."""
  text, stop = TextStream(tokenizer), set(stop_ids)

  def listener(tokens, step, finished):
    if not finished[0] and int(tokens[0]) not in stop:
      sys.stdout.write(text.push(int(tokens[0])))
      sys.stdout.flush()
  return listener


def _decode_text(tokenizer, ids: Sequence[int]) -> str:
  return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))


if __name__ == "__main__":
  sys.exit(main())
