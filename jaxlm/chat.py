"""Interactive terminal chat with a jaxlm model: history, sampling settings, reasoning modes and a safety filter.

  python -m jaxlm.chat --checkpoint DIR [--format auto|dialogue|plain] [--temperature 0.8] [--top-p 0.9]
                       [--top-k 0] [--repetition-penalty 1.0] [--max-new-tokens 200] [--mode MODE]
                       [--blocklist FILE | --no-safety] [--batch] [--seed 0] [--which latest|best] [--verbose]
  printf 'hello\\nstatus\\nquit\\n' | python -m jaxlm.chat --checkpoint DIR      # piped input works too

HROM-format models (family hrom, or trained with data.format=dialogue) talk in `<s><user> ...</s><assistant>
...</s>` turns; the oldest turns are dropped first when the conversation outgrows the context. Other models
continue the running text. Each reply ends with its time, tokens/s, mode and temperature; Ctrl-C stops a
reply, and at the prompt (like the end of the input, or `quit`) ends the chat. The safety filter (jaxlm.safety)
checks whole words of your input and of the reply as it streams; its list is a plain text file you can edit
(default: the one shipped in jaxlm/data/assets/blocklist.txt).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import List, Optional, Sequence, Tuple

import jax
import numpy as np

from jaxlm import errors, gen_defaults, generate, validate
from jaxlm.models import apply_reasoning
from jaxlm.safety import Blocklist, StreamGuard
from jaxlm.sampling import Sampling

COMMANDS = """commands:
  mode fast|normal|deep|extreme   reasoning mode of an HRM model (N cycles x T steps)
  temp X                          temperature (0 = greedy)
  top_p X                         nucleus sampling: keep the most likely tokens up to mass X (1 = off)
  interactive | batch             show the reply token by token | whole when done
  unlimited                       on/off: reply until an end token, a sentence end (natural) or Ctrl-C
  natural                         on/off: stop at the end of a sentence
  status                          model, parameters, vocabulary, datasets trained, settings
  reset                           forget the conversation
  help                            this list
  quit | exit                     leave"""
DEFAULT_MODES = ("fast", "normal", "deep", "extreme")
UNLIMITED_TOKENS = 4096
# HROM's tokenizer ids (its trainer's order). An imported HROM checkpoint has no tokenizer file, only ids.
HROM_MARKER_IDS = {"<s>": [1], "</s>": [2], "<user>": [4], "<assistant>": [5]}
_SENTENCE_END = re.compile(r"\w[.!?][\"')\]]*$")


@dataclasses.dataclass
class Settings:
  mode: Optional[str] = None    # None: an HRM model's own N x T ("normal" shown for other models)
  temperature: float = 0.8
  top_p: float = 0.9
  top_k: int = 0
  repetition_penalty: float = 1.0
  penalty_style: str = "sign"
  max_new_tokens: int = 200
  unlimited: bool = False
  natural: bool = False
  interactive: bool = True
  seed: int = 0
  repeat_stop: int = 0          # stop a reply after one token more than N times in a row (HRM's chat); 0 = off

  def sampling(self) -> Sampling:
    return Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                    repetition_penalty=self.repetition_penalty, penalty_style=self.penalty_style)


# ------------------------------------------------------------------------------------------ formats
def _is_text(tokenizer) -> bool:
  return tokenizer is not None and getattr(tokenizer, "kind", "") != "ids"


def _encode(tokenizer, text: str) -> List[int]:
  if tokenizer is None:  # no usable tokenizer: the user types token ids
    try:
      return [int(f) for f in text.replace(",", " ").split()]
    except ValueError:
      raise ValueError("this model has no usable tokenizer: type token ids, e.g. 12 7 33") from None
  return list(tokenizer.encode(text))


def _marker(tokenizer, marker: str) -> List[int]:
  """A role marker's ids: its own token where the vocabulary has one (HROM's BPE encode would append </s>)."""
  token_id = getattr(tokenizer, "token_id", lambda _: None)(marker)
  return [token_id] if token_id is not None else _encode(tokenizer, marker)


class DialogueFormat:
  """HROM's turns, as jaxlm's `dialogue` data format writes them: <s><user> u</s><assistant> a</s>..."""
  name = "dialogue"
  description = "dialogue turns <s><user> ...</s><assistant> ...</s>"

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.text = _is_text(tokenizer)
    self.markers = ({m: _marker(tokenizer, m) for m in HROM_MARKER_IDS} if self.text else HROM_MARKER_IDS)
    end = self.markers["</s>"]
    self.stop_ids = sorted(set(generate.default_stop_ids(tokenizer) + (end if len(end) == 1 else [])))
    self.stop_text = "</s>" if self.text else None  # a marker spelled in several tokens (char vocabularies)

  def encode_message(self, text: str, history_empty: bool) -> List[int]:
    return _encode(self.tokenizer, " " + text if self.text else text)

  def encode_reply(self, text: str) -> List[int]:
    return _encode(self.tokenizer, " " + text if self.text else text) if text else []

  def prompt(self, history: Sequence[Tuple[List[int], List[int]]], message: List[int], budget: int) -> List[int]:
    m = self.markers
    tail = m["<user>"] + message + m["</s>"] + m["<assistant>"]
    turns = [m["<user>"] + u + m["</s>"] + m["<assistant>"] + a + m["</s>"] for u, a in history]
    while turns and len(m["<s>"]) + sum(map(len, turns)) + len(tail) > budget:
      turns.pop(0)  # oldest turn first
    ids = m["<s>"] + [t for turn in turns for t in turn] + tail
    return ids[-budget:]

  def clean(self, text: str) -> str:
    return text.lstrip()


class PlainFormat:
  """A plain LM: each message is appended to the running text and the model continues it."""
  name = "plain"
  description = "plain continuation of the running text"

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.text = _is_text(tokenizer)
    self.stop_ids = generate.default_stop_ids(tokenizer)
    self.stop_text = None
    self.separator = ""
    for candidate in ("\n", " "):  # what joins turns, if the vocabulary has it
      try:
        if self.text and _encode(tokenizer, candidate):
          self.separator = candidate
          break
      except ValueError:
        continue

  def encode_message(self, text: str, history_empty: bool) -> List[int]:
    return _encode(self.tokenizer, text if history_empty or not self.text else self.separator + text)

  def encode_reply(self, text: str) -> List[int]:
    return _encode(self.tokenizer, text) if text else []

  def prompt(self, history, message, budget):
    ids = [t for u, a in history for t in u + a] + message
    return ids[-budget:]

  def clean(self, text: str) -> str:
    return text


def model_family(model: generate.Model) -> str:
  """The original family (hrom, yinggem, ...) from config.json, or from a training run's config."""
  return model.model_dict.get("family") or (model.run_config.get("model") or {}).get("family") or ""


def choose_format(model: generate.Model, requested: str = "auto"):
  if requested == "dialogue":
    return DialogueFormat(model.tokenizer)
  if requested == "plain":
    return PlainFormat(model.tokenizer)
  if requested != "auto":
    raise ValueError(f"--format must be auto, dialogue or plain, got {requested!r}")
  data = model.run_config.get("data") or {}
  if model_family(model) == "hrom" or data.get("format") == "dialogue":
    return DialogueFormat(model.tokenizer)
  return PlainFormat(model.tokenizer)


def _held_back(text: str, stop_text: Optional[str]) -> int:
  """Length of the longest suffix of `text` that could be the start of `stop_text`."""
  if not stop_text:
    return 0
  for n in range(min(len(stop_text) - 1, len(text)), 0, -1):
    if stop_text.startswith(text[-n:]):
      return n
  return 0


# ------------------------------------------------------------------------------------------ session
class Chat:
  def __init__(self, model: generate.Model, settings: Settings, blocklist: Blocklist, fmt, out=sys.stdout,
               context: Optional[int] = None, strategy: str = "auto"):
    self.model = model
    self.settings = settings
    self.blocklist = blocklist
    self.format = fmt
    self.out = out
    self.context_arg = context
    self.strategy = strategy
    self.history: List[Tuple[List[int], List[int]]] = []
    self.turns = 0
    self.interrupted = False
    self.modes = self._reasoning_modes()
    if self._is_hrm():  # start in --mode if given, else in the model's own N x T (named when it is a mode)
      self.generator = self._make_generator(settings.mode)
      self.settings.mode = settings.mode or self._mode_name(self.generator.config)
    else:
      self.generator = self._make_generator(None)
      self.settings.mode = settings.mode or "normal"
    self.n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))

  # --- model
  def _is_hrm(self) -> bool:
    return getattr(self.model.config, "arch", "") == "hrm"

  def _reasoning_modes(self) -> Tuple[str, ...]:
    if self._is_hrm():
      try:
        from jaxlm.models import hrm
        return tuple(getattr(hrm, "REASONING_MODES", DEFAULT_MODES))
      except ImportError:
        pass
    return DEFAULT_MODES

  def _mode_name(self, config) -> str:
    n, t = getattr(config, "n_cycles", None), getattr(config, "t_steps", None)
    try:
      from jaxlm.models import hrm
      named = {tuple(v): k for k, v in hrm.REASONING_MODES.items()}
    except (ImportError, AttributeError):
      named = {}
    return named.get((n, t), f"N={n} T={t}")

  def _make_generator(self, mode: Optional[str]) -> generate.Generator:
    config, module = apply_reasoning(self.model.config, self.model.module, mode=mode)
    return generate.Generator(module, self.model.params, context=self.context_arg, strategy=self.strategy)

  def say(self, text: str = "", end: str = "\n") -> None:
    self.out.write(text + end)
    self.out.flush()

  # --- commands
  def handle(self, line: str) -> bool:
    """Runs one input line (a command or a message); False when the chat should end."""
    text = line.strip()
    if not text:
      return True
    word, _, arg = text.partition(" ")
    command = word.lower()
    arg = arg.strip()
    if command in ("quit", "exit") and not arg:
      return False
    with_arg = {"mode": self._mode, "temp": self._temp, "top_p": self._top_p}
    without_arg = {"interactive": self._interactive, "batch": self._batch, "unlimited": self._unlimited,
                   "natural": self._natural, "status": self._status, "reset": self._reset, "help": self._help}
    if command in with_arg:
      with_arg[command](arg)
    elif command in without_arg and not arg:
      without_arg[command](arg)
    else:  # anything else, including "reset the story", is a message
      self.respond(text)
    return True

  def _mode(self, arg):
    if arg not in self.modes:
      self.say(f"[modes: {', '.join(self.modes)}; now {self.settings.mode}]")
      return
    if self._is_hrm():
      try:
        self.generator = self._make_generator(arg)
      except ValueError as e:
        self.say(f"[error: {e}]")
        return
      self.settings.mode = arg
      self.say(f"[mode {arg}]")
    else:
      self.settings.mode = arg
      self.say(f"[mode {arg}: no effect on this model; reasoning modes change HRM models "
               f"(arch {getattr(self.model.config, 'arch', '?')} decodes in one pass)]")

  def _number(self, arg, name, low, high, cast=float):
    try:
      value = cast(arg)
    except ValueError:
      value = None
    if value is not None and not np.isfinite(value):
      value = None
    if value is None or not low <= value <= high:
      self.say(f"[{name} needs a number in [{low}, {high}], got {arg!r}]")
      return None
    return value

  def _temp(self, arg):
    value = self._number(arg, "temp", 0.0, 100.0)
    if value is not None:
      self.settings.temperature = value
      self.say(f"[temperature {value:g}{' (greedy)' if value == 0 else ''}]")

  def _top_p(self, arg):
    value = self._number(arg, "top_p", 0.0, 1.0)
    if value is not None:
      self.settings.top_p = value
      self.say(f"[top_p {value:g}]")

  def _interactive(self, _):
    self.settings.interactive = True
    self.say("[interactive: tokens are shown as they come]")

  def _batch(self, _):
    self.settings.interactive = False
    self.say("[batch: each reply is shown when complete]")

  def _unlimited(self, _):
    self.settings.unlimited = not self.settings.unlimited
    self.say(f"[unlimited {'on: up to ' + str(UNLIMITED_TOKENS) + ' tokens' if self.settings.unlimited else 'off: up to ' + str(self.settings.max_new_tokens) + ' tokens'}]")

  def _natural(self, _):
    self.settings.natural = not self.settings.natural
    self.say(f"[natural {'on: replies stop at a sentence end' if self.settings.natural else 'off'}]")

  def _reset(self, _):
    self.history.clear()
    self.say("[conversation reset]")

  def _help(self, _):
    self.say(COMMANDS)

  def _status(self, _):
    m, s = self.model, self.settings
    family = model_family(m) or "-"
    where = "training workdir" if m.run_config else "model directory"
    vocab = getattr(m.config, "vocab_size", "?")
    kind = getattr(m.tokenizer, "kind", "none")
    decoding = ("KV cache (causal decoder)" if self.generator.strategy == "cache"
                else "full recompute each token (as the original model does)")
    mode_note = "" if self._is_hrm() else " (no effect on this model)"
    self.say(f"model: {family} (arch {getattr(m.config, 'arch', '?')}), {where} {m.path}")
    self.say(f"parameters: {self.n_params:,}")
    self.say(f"vocabulary: {vocab} tokens, tokenizer {kind}")
    self.say(f"datasets trained: {self._datasets()}")
    self.say(f"decoding: {decoding}, context {self.generator.context} tokens; format {self.format.description}")
    self.say(f"settings: mode {s.mode}{mode_note}, temperature {s.temperature:g}, top_p {s.top_p:g}, "
             f"top_k {s.top_k}, repetition penalty {s.repetition_penalty:g} ({s.penalty_style}), "
             f"max new tokens {UNLIMITED_TOKENS if s.unlimited else s.max_new_tokens}"
             f"{' (unlimited)' if s.unlimited else ''}, natural {'on' if s.natural else 'off'}, "
             f"output {'interactive' if s.interactive else 'batch'}, seed {s.seed}")
    safety = (f"{len(self.blocklist)} blocked words/phrases from {self.blocklist.source}"
              if len(self.blocklist) else "off")
    self.say(f"safety: {safety}")
    self.say(f"history: {len(self.history)} turn(s)")

  def _datasets(self) -> str:
    data = self.model.run_config.get("data") or {}
    if data.get("corpus"):
      return f"{data['corpus']} (format {data.get('format', 'text')}, tokenizer {data.get('tokenizer', '?')})"
    extras = self.model.source.get("extras") or {}
    trained = self.model.source.get("datasets_trained") or (
        extras.get("datasets_trained") if isinstance(extras, dict) else None)
    if trained:
      return ", ".join(map(str, trained))
    if self.model.source.get("file"):
      return f"not recorded (converted from {self.model.source.get('family', '?')} checkpoint {self.model.source['file']})"
    return "not recorded"

  # --- replies
  def respond(self, text: str) -> None:
    hit = self.blocklist.find(text)
    if hit:
      self.say(f"[blocked: your message contains {hit!r}, which is on the blocklist; it was not sent]")
      return
    try:
      message = self.format.encode_message(text, not self.history)
    except ValueError as e:
      self.say(f"[error: {e}]")
      return
    s = self.settings
    context = self.generator.context
    max_new = UNLIMITED_TOKENS if s.unlimited else s.max_new_tokens
    budget = max(1, context - min(max_new, context // 2))
    prompt = self.format.prompt(self.history, message, budget)
    reply = _Reply(self, StreamGuard(self.blocklist))
    try:  # Ctrl-C during a reply stops that reply (the decode loop asks after every token)
      with generate.StopOnInterrupt(raise_after=False) as interrupt:
        out = self.generator.generate([prompt], max_new, sampling=s.sampling(), stop_ids=self.format.stop_ids,
                                      seed=s.seed + self.turns, stop_check=interrupt,
                                      listener=gen_defaults.combine(reply.on_tokens,
                                                                    gen_defaults.repeat_stopper(s.repeat_stop)))
    except ValueError as e:
      self.say(f"[error: {e}]")
      return
    self.interrupted = interrupt.requested
    self.turns += 1
    reply.finish()
    n = len(out.tokens[0])
    if reply.hit:
      self.say(f"[reply stopped: it contained {reply.hit!r}, which is on the blocklist]")
    elif self.interrupted:
      self.say("[reply stopped: interrupted]")
    self.history.append((message, self.format.encode_reply(reply.shown)))
    self.say(f"[{out.seconds:.2f} s{' incl. compilation' if out.compiled else ''} | "
             f"{n / max(out.seconds, 1e-9):.1f} tokens/s | {n} tokens | mode {s.mode} | temp {s.temperature:g}]")


class _Reply:
  """Follows one reply token by token: stop text, natural stop, safety; shows what is safe to show."""

  def __init__(self, chat: Chat, guard: StreamGuard):
    self.chat = chat
    self.guard = guard
    self.stream = generate.TextStream(chat.model.tokenizer)
    self.shown = ""
    self.hit: Optional[str] = None
    self.ended = False
    self.started = False

  def _visible(self) -> Tuple[str, bool]:
    """(reply text so far without what may still become the stop text, whether the reply is complete)."""
    text = self.stream.text()
    stop_text = self.chat.format.stop_text
    if stop_text and stop_text in text:
      return self.chat.format.clean(text[:text.index(stop_text)]), True
    text = text[:len(text) - _held_back(text, stop_text)]
    return self.chat.format.clean(text), False

  def _show(self, new: str) -> None:
    self.shown += new
    if new and self.chat.settings.interactive:
      if not self.started:
        self.chat.say("model> ", end="")
        self.started = True
      self.chat.say(new, end="")

  def on_tokens(self, tokens, step, finished) -> bool:
    if finished[0] or self.hit or self.ended:
      return True
    token = int(tokens[0])
    if token in self.chat.format.stop_ids:
      return False  # the loop ends the row itself
    self.stream.ids.append(token)
    if self.stream.text().endswith("\ufffd"):
      return False
    text, complete = self._visible()
    natural = self.chat.settings.natural and bool(_SENTENCE_END.search(text.rstrip()))
    new, self.hit = self.guard.feed(text, final=complete or natural)
    self._show(new)
    self.ended = complete or natural
    return bool(self.hit) or self.ended

  def finish(self) -> None:
    if not self.hit:
      text, _ = self._visible()
      new, self.hit = self.guard.feed(text, final=True)
      self._show(new)
    if not self.chat.settings.interactive or not self.started:
      self.chat.say(f"model> {self.shown}")
    else:
      self.chat.say()


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
  doc = __doc__.split("\n\n")
  parser = argparse.ArgumentParser(prog="python -m jaxlm.chat", description=doc[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n\n".join(doc[1:]) + "\n\n" + COMMANDS)
  d = Settings()  # sampling flags left out take the model's stored generation defaults, then these
  parser.add_argument("--checkpoint", required=True, help="model directory or training workdir")
  parser.add_argument("--which", choices=("latest", "best"), default="latest")
  parser.add_argument("--format", choices=("auto", "dialogue", "plain"), default="auto")
  parser.add_argument("--mode", help="HRM reasoning mode (fast, normal, deep, extreme; default: the model's own)")
  parser.add_argument("--temperature", type=float, help=f"default: the model's, else {d.temperature}")
  parser.add_argument("--top-p", type=float, help=f"default: the model's, else {d.top_p}")
  parser.add_argument("--top-k", type=int, help=f"default: the model's, else {d.top_k}")
  parser.add_argument("--repetition-penalty", type=float, help=f"default: the model's, else {d.repetition_penalty}")
  parser.add_argument("--penalty-style", choices=("sign", "divide"), help="default: the model's, else sign")
  parser.add_argument("--repeat-stop", type=int, help="stop a reply after one token more than N times in a row "
                                                      "(default: the model's: 10 for HRM, else off)")
  parser.add_argument("--max-new-tokens", type=int, help=f"default: the model's, else {d.max_new_tokens}")
  parser.add_argument("--context", type=int, default=0, help="tokens the model sees (default model.max_seq_len)")
  parser.add_argument("--decode", choices=generate.STRATEGIES, default="auto")
  parser.add_argument("--blocklist", help="blocklist file (default: the shipped jaxlm/data/assets/blocklist.txt)")
  parser.add_argument("--no-safety", action="store_true", help="turn the blocklist filter off")
  parser.add_argument("--batch", action="store_true", help="show each reply when complete (command: batch)")
  parser.add_argument("--natural", action="store_true", help="stop replies at a sentence end")
  parser.add_argument("--seed", type=int, default=d.seed)
  parser.add_argument("--verbose", action="store_true", help="print the traceback of an error (or JAXLM_VERBOSE=1)")
  return parser


def _input_lines(stdin, chat: Chat):
  if stdin is sys.stdin and stdin.isatty():
    while True:
      try:
        yield input("you> ")
      except EOFError:
        chat.say()
        return
  else:
    for line in stdin:  # piped: echo, so the transcript reads like a session
      line = line.rstrip("\r\n")
      chat.say(f"you> {line}")
      yield line


def main(argv=None, stdin=None, stdout=None) -> int:
  """Exit codes (jaxlm.errors): 0 the chat ended (quit, end of input, Ctrl-C at the prompt), 1 a failure while
  running, 2 bad input, 130 Ctrl-C before the chat started."""
  argv = sys.argv[1:] if argv is None else list(argv)
  return errors.run_command(lambda: _run(build_parser().parse_args(argv), stdin or sys.stdin, stdout or sys.stdout),
                            argv)


def _run(args, stdin, out) -> int:
  validate.check_args(args, {**generate.SAMPLING_ARGS, **generate.SAMPLING_ARGS_GEN})
  Sampling(**{k: v for k, v in vars(args).items() if k in generate.SAMPLING_FIELDS and v is not None})
  blocklist = Blocklist([], source="off") if args.no_safety else Blocklist.load(args.blocklist)
  model = generate.load(args.checkpoint, args.which)
  d = Settings()
  chosen = gen_defaults.resolve(vars(args), model.generation, {**{k: getattr(d, k) for k in (
      *generate.SAMPLING_FIELDS, "max_new_tokens")}, "repeat_stop": 0})
  settings = Settings(mode=args.mode, **chosen, natural=args.natural, interactive=not args.batch, seed=args.seed)
  chat = Chat(model, settings, blocklist, choose_format(model, args.format), out=out,
              context=args.context or None, strategy=args.decode)
  if args.mode is not None and args.mode not in chat.modes:
    raise ValueError(f"--mode must be one of {', '.join(chat.modes)}, got {args.mode!r}")
  chat.say(f"[jaxlm chat: {model_family(model) or getattr(model.config, 'arch', '?')}, "
           f"{chat.n_params:,} parameters, {chat.format.name} format; 'help' lists commands]")
  try:
    for line in _input_lines(stdin, chat):
      if not chat.handle(line):
        break
  except KeyboardInterrupt:  # Ctrl-C outside a reply (a reply catches its own): leave as 'quit' does
    chat.say()
  chat.say("[bye]")
  return 0


if __name__ == "__main__":
  sys.exit(main())
