"""Autoregressive generation: a jitted prefill and a jitted decode loop, with a KV cache or by full recompute.

  python -m jaxlm.generate --checkpoint DIR (--prompt "text" | --prompt-ids 1,2,3)... --max-new-tokens N
      [--temperature 0] [--top-k K] [--top-p P] [--repetition-penalty R --penalty-style sign|divide]
      [--seed S] [--stop-ids 2,3|none] [--context C] [--decode auto|cache|recompute] [--stream]
      [--mode fast|normal|deep|extreme --n-cycles N --t-steps T] [--which latest|best] [--print-ids]

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

Sampling and its order of operations: jaxlm.sampling.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import sys
import time
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxlm import kv_cache
from jaxlm.models import apply_reasoning
from jaxlm.sampling import Sampling, Stages, choose, token_counts

STRATEGIES = ("auto", "cache", "recompute")
FILL = -1  # output slot of a row that has finished

# A listener sees each step's tokens as they are chosen: listener(tokens [B], step, finished [B]) and may
# return a bool array [B] (or one bool) asking rows to stop after this token (safety filter, "natural" stop).
Listener = Callable[[np.ndarray, int, np.ndarray], Any]


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
      halt = io_callback(plan.relay, jax.ShapeDtypeStruct((b,), jnp.bool_), tokens, step, finished > 0,
                         ordered=True)
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
               listener: Optional[Listener] = None) -> Output:
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
    prompt_len = min(_bucket(int(lengths.max())), self.context)
    max_new = _bucket(max_new_tokens, 16)
    batch = np.zeros((len(windows), prompt_len), np.int32)
    for row, w in enumerate(windows):
      batch[row, :len(w)] = w
    stages = sampling.stages()
    counts = jnp.asarray(token_counts(prompts, self.vocab_size)) if stages.penalty else None
    plan = _Plan(module=self.module, use_cache=self.strategy == "cache", batch=len(prompts),
                 prompt_len=prompt_len, max_new=max_new, window_len=min(prompt_len + max_new, self.context),
                 stages=stages, stop_ids=tuple(sorted(set(int(i) for i in stop_ids))),
                 relay=self._relay if listener is not None else None)
    self._relay.listener = listener
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


def _compiled_loops() -> int:
  size = getattr(_decode, "_cache_size", None)  # a private jax API: only used to label timings
  return size() if callable(size) else 0


def generate(module, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             sampling: Sampling = Sampling(), stop_ids: Sequence[int] = (), seed: int = 0,
             context: Optional[int] = None, strategy: str = "auto",
             listener: Optional[Listener] = None) -> Output:
  """One-shot form of Generator(...).generate(...)."""
  return Generator(module, params, context=context, strategy=strategy).generate(
      prompts, max_new_tokens, sampling=sampling, stop_ids=stop_ids, seed=seed, listener=listener)


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
  run_config = {}
  if modeldir.is_workdir(checkpoint):
    try:
      run_config = modeldir.read_config(checkpoint).get("config") or {}
    except (FileNotFoundError, ValueError):
      pass  # an older workdir without config.json: only the status line loses its data section
  return Model(config, module, jax.tree.map(jnp.asarray, loaded.params), tokenizer, checkpoint,
               dict(loaded.model_dict), dict(loaded.source), run_config, tokenizer_error)


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


# -------------------------------------------------------------------------------------- CLI
def _parse_ids(text: str) -> List[int]:
  fields = [f for f in text.replace(",", " ").split() if f]
  try:
    return [int(f) for f in fields]
  except ValueError:
    raise ValueError(f"--prompt-ids {text!r}: give integer ids like 1,2,3") from None


def _parse_stop(text: Optional[str], tokenizer) -> List[int]:
  if text is None:
    return default_stop_ids(tokenizer)
  if text.strip().lower() == "none":
    return []
  return _parse_ids(text)


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
  parser.add_argument("--max-new-tokens", type=int, default=100)
  parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
  parser.add_argument("--top-k", type=int, default=0, help="0 = off")
  parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
  parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
  parser.add_argument("--penalty-style", choices=("sign", "divide"), default="sign",
                      help="sign: CTRL/Hugging Face (default); divide: YingGem's logit / penalty^count")
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
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    if not args.prompt and not args.prompt_ids:
      raise ValueError("give --prompt TEXT or --prompt-ids IDS")
    model = load(args.checkpoint, args.which, args.mode, args.n_cycles, args.t_steps)
    if args.prompt and model.tokenizer is None:
      raise ValueError(f"--prompt needs a tokenizer and {model.tokenizer_error}; use --prompt-ids")
    prompts = [model.tokenizer.encode(text) for text in args.prompt] + [_parse_ids(t) for t in args.prompt_ids]
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, penalty_style=args.penalty_style)
    stop_ids = _parse_stop(args.stop_ids, model.tokenizer)
    generator = Generator(model.module, model.params, context=args.context or None, strategy=args.decode)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  stream = args.stream if args.stream is not None else (sys.stdout.isatty() and len(prompts) == 1)
  if stream and len(prompts) != 1:
    print("error: --stream prints one prompt's tokens; give a single prompt", file=sys.stderr)
    return 2
  listener = _printer(model.tokenizer, stop_ids) if stream else None
  try:
    out = generator.generate(prompts, args.max_new_tokens, sampling=sampling, stop_ids=stop_ids, seed=args.seed,
                             listener=listener)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
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
