"""Checks values before any work: every field of a training config, and the numbers a command line gives.

  warnings = validate.check_config(config)   # ValueError naming every bad field; returns what is only odd
  validate.check_args(args, {"top_p": validate.number(0, 1)})       # argparse values, named as flags

A problem reads `FIELD=VALUE: must be ALLOWED`, e.g. `train.save_every=0: must be an integer >= 1`; all the
problems of a config go in one line, joined by '; '. The model section is checked against its architecture's
config class (jaxlm.models), whose own `validate` adds what only it knows (heads dividing the width, the
enumerated compatibility flags). Nothing here builds a model or compiles anything.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Dict, List, Mapping, Optional, Tuple

SEED_LIMIT = 2 ** 32  # jax.random.key keeps 32 bits: seed 2**32 would silently be seed 0
SECTIONS = ("model", "data", "opt", "train", "mesh")


# ------------------------------------------------------------------------------------------ rules
@dataclasses.dataclass(frozen=True)
class Rule:
  """What one field may hold: a kind ('int', 'number', 'bool', 'str', 'choice'), a range, special values."""
  kind: str
  low: Optional[float] = None
  high: Optional[float] = None
  low_open: bool = False          # > low rather than >= low
  high_open: bool = False         # < high rather than <= high
  choices: Tuple[Any, ...] = ()
  special: Tuple[Tuple[Any, str], ...] = ()  # values allowed outside the range, with their meaning
  note: str = ""                  # what a value in range means, e.g. '0 = off'
  per_item: bool = False          # a list/tuple of such values is allowed too (one per layer)
  required: bool = True           # a config section must have the field

  def allows(self, value: Any) -> bool:
    if self.per_item and isinstance(value, (list, tuple)):
      return all(self.allows(v) for v in value)
    if any(_same(value, s) for s, _ in self.special):
      return True
    if self.kind == "choice":
      return any(_same(value, c) for c in self.choices)
    if self.kind == "bool":
      return isinstance(value, bool)
    if self.kind == "str":
      return isinstance(value, str)
    if not _is_number(value) or (self.kind == "int" and not _is_integer(value)) or not math.isfinite(value):
      return False
    return _in_range(value, self.low, self.high, self.low_open, self.high_open)

  def text(self) -> str:
    """'an integer >= 1', 'a number in [0, 1)', "one of 'adamw', 'adafactor'", ..."""
    if self.kind == "choice":
      allowed = f"one of {', '.join(map(repr, self.choices))}"
    elif self.kind in ("bool", "str"):
      allowed = "true or false" if self.kind == "bool" else "a string"
    else:
      allowed = ("an integer" if self.kind == "int" else "a number") + _range_text(self)
    specials = [f"{_show(v)} ({meaning})" for v, meaning in self.special]
    text = " or ".join(specials + [allowed + (f" ({self.note})" if self.note else "")])
    return text + (", or one per layer" if self.per_item else "")

  def problem(self, name: str, value: Any) -> Optional[str]:
    return None if self.allows(value) else f"{name}={_show(value)}: must be {self.text()}"


def integer(low: Optional[int] = None, high: Optional[int] = None, **kw) -> Rule:
  return Rule("int", low, high, **kw)


def number(low: Optional[float] = None, high: Optional[float] = None, **kw) -> Rule:
  return Rule("number", low, high, **kw)


def choice(*values: Any, **kw) -> Rule:
  return Rule("choice", choices=tuple(values), **kw)


def optional(rule: Rule) -> Rule:
  """The field may be absent (fields other work adds, older configs); checked when present."""
  return dataclasses.replace(rule, required=False)


BOOL = Rule("bool")
STRING = Rule("str")
SEED = integer(0, SEED_LIMIT, high_open=True)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _same(a: Any, b: Any) -> bool:
  """Equal, with True never standing for 1 (nor 1 for True)."""
  if isinstance(a, bool) or isinstance(b, bool):
    return type(a) is type(b) and a == b
  return a == b


def _in_range(value, low, high, low_open, high_open) -> bool:
  above = low is None or (value > low if low_open else value >= low)
  below = high is None or (value < high if high_open else value <= high)
  return above and below


def _range_text(rule: Rule) -> str:
  low, high = rule.low, rule.high
  if low is not None and high is not None:
    return f" in {'(' if rule.low_open else '['}{_show(low)}, {_show(high)}{')' if rule.high_open else ']'}"
  if low is not None:
    return f" {'>' if rule.low_open else '>='} {_show(low)}"
  if high is not None:
    return f" {'<' if rule.high_open else '<='} {_show(high)}"
  return ""


def _show(value: Any) -> str:
  if isinstance(value, (str, bool)) or value is None:
    return repr(value)
  if _is_integer(value):
    return str(int(value))
  if _is_number(value):
    return repr(float(value))
  return repr(value)


# ------------------------------------------------------------------------------------------ the config
@functools.lru_cache(maxsize=None)
def section_rules() -> Dict[str, Dict[str, Rule]]:
  """Rules of the data, opt, train and mesh sections (the model's come from its config class)."""
  from jaxlm import pairwise_sum  # the enumerations live with what they name
  from jaxlm.data import loader, sources, tokenizers
  mesh_axis = integer(1, special=((-1, "every remaining device"),))
  return {
      "data": {
          "corpus": STRING, "text_field": STRING, "tokenizer_path": STRING,
          "format": choice(*sorted(sources._FORMATS)),
          # what a config may train, and the kinds a saved tokenizer.json may be (vocab: HRM's, for init_from)
          "tokenizer": choice(*sorted(set(tokenizers._FACTORIES) | set(tokenizers._KINDS))),
          "packing": choice(*sorted(loader.PACKINGS)),
          "cache_dir": STRING, "tfds_data_dir": STRING, "language": STRING, "mixture": STRING,
          "min_chars": integer(0, note="0 = keep every document"), "loss_on": choice(*sources.LOSS_ON),
          "fraction": number(0, 1, low_open=True),
          "replay": number(0, 1, high_open=True), "replay_corpus": STRING,
          "vocab_size": integer(0, note="0 = the tokenizer's"),
          "val_fraction": number(0, 1, high_open=True),
          "eval_batches": integer(0, note="0 = all"),
      },
      "opt": {
          "name": choice("adamw", "adafactor", "muon"),
          "adam_lr": optional(number(0, note="0 = opt.lr")), "muon_momentum": optional(number(0, 1, high_open=True)),
          "schedule": choice("cosine", "linear", "constant", "rsqrt_relative"),
          "weight_decay_on": choice("matrices", "all"),
          "lr": number(0), "warmup_steps": integer(0), "min_lr_ratio": number(0, 1),
          "b1": number(0, 1, high_open=True), "b2": number(0, 1, high_open=True), "eps": number(0, low_open=True),
          "weight_decay": number(0), "clip_norm": number(0, note="0 = off"), "grad_accum": integer(1),
      },
      "train": {
          "steps": integer(1), "batch_size": integer(1), "seq_len": integer(1),
          "eval_every": integer(0, note="0 = off"), "save_every": integer(1), "log_every": integer(1),
          "batches_per_put": integer(1),
          "eval_batch_size": integer(0, note="0 = batch_size"), "seed": SEED,
          "keep_checkpoints": integer(1), "patience": integer(0, note="0 = off"),
          "sample_tokens": integer(0, note="0 = none"), "sample_every": integer(0, note="0 = off"), "sample_prompt": STRING,
          "sample_temperature": number(0), "progress": BOOL,
          "on_nonfinite": optional(choice("stop", "skip")), "on_unrestorable": optional(choice("fail", "fresh")),
          "init_from": optional(STRING), "init_which": optional(choice("latest", "best")),
          "init_optimizer": optional(BOOL),
          "grow_every_chars": integer(0, note="0 = off"), "grow_layers": integer(1),
          "grow_reset_optimizer": optional(BOOL),
          "on_new_corpus": optional(choice("continue", "fresh", "ask")),
          "eval_windows": optional(integer(0, note="0 = the whole validation split")),
          "target_eval_loss": optional(number(0, note="0 = off")),
      },
      "mesh": {"data": mesh_axis, "fsdp": mesh_axis, "model": mesh_axis,
               "cpu_devices": optional(integer(1, special=((-1, "one per core"),))),
               "grad_sum": choice(*pairwise_sum.CHOICES)},
  }


# Model fields whose range the architecture's `validate` does not check (it does check negatives of every int).
MODEL_RULES: Dict[str, Rule] = {
    "vocab_size": integer(0, note="0 = the tokenizer's"),
    "d_model": integer(1), "n_layers": integer(1), "n_heads": integer(1), "d_ff": integer(1),
    "max_seq_len": integer(2),
    "norm_eps": number(0, low_open=True), "rope_theta": number(0, low_open=True),
    "expansion": number(0, low_open=True),
    "dropout": number(0, 1, high_open=True), "attention_dropout": number(0, 1, high_open=True),
    "mlp_dropout": number(0, 1, high_open=True),
    "embed_init_std": number(0), "init_std": number(0), "out_init_std": number(0), "head_init_std": number(0),
    "ponder_loss_weight": number(0),
    "attention_window": integer(0, note="0 = full attention", per_item=True),
    "dtype": choice("auto", "float32", "bfloat16", "float16"),
    "attention_block": integer(1), "xent_chunk": integer(0, note="0 = auto"), "vocab_multiple": integer(1),
    "scan_unroll": integer(1),
}
_TYPE_RULES = {"int": integer(0), "float": number(), "bool": BOOL, "str": STRING}


def _get(section: Any, name: str) -> Tuple[bool, Any]:
  """(present, value) for a ConfigDict or a plain mapping."""
  try:
    return (True, section[name]) if name in section else (False, None)
  except TypeError:
    return False, None


def _as_dict(section: Any) -> Dict[str, Any]:
  return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def _section_problems(name: str, section: Any, rules: Mapping[str, Rule]) -> List[str]:
  problems = []
  for field, rule in rules.items():
    present, value = _get(section, field)
    if not present:
      if rule.required:
        problems.append(f"{name}.{field}: missing (must be {rule.text()})")
      continue
    problem = rule.problem(f"{name}.{field}", value)
    if problem:
      problems.append(problem)
  return problems


def _model_problems(model: Mapping[str, Any]) -> List[str]:
  """Types and ranges of the model fields, then (if those pass) the architecture's own validate()."""
  import jaxlm.models  # noqa: F401  (registers every architecture)
  from jaxlm.models import config_base
  arch = model.get("arch", "decoder")
  if arch not in config_base._REGISTRY:
    return [f"model.arch={_show(arch)}: must be {choice(*sorted(config_base._REGISTRY)).text()}"]
  config_cls = config_base._REGISTRY[arch][0]
  problems = []
  for f in dataclasses.fields(config_cls):
    type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    rule = MODEL_RULES.get(f.name) or _TYPE_RULES.get(type_name)
    if f.name in model and rule is not None:
      problem = rule.problem(f"model.{f.name}", model[f.name])
      if problem:
        problems.append(problem)
  if not problems:
    try:
      config_cls.from_dict(model)
    except (ValueError, TypeError) as e:
      problems.append(str(e))
  return problems


def _cross_problems(c: Mapping[str, Dict[str, Any]]) -> List[str]:
  """Fields that are each in range but do not fit together."""
  model, data, opt, train = c["model"], c["data"], c["opt"], c["train"]
  problems = []
  batch, accum = train.get("batch_size"), opt.get("grad_accum")
  if _positive_ints(batch, accum) and batch % accum:
    problems.append(f"train.batch_size={batch} is not divisible by opt.grad_accum={accum} (each step scans "
                    f"{accum} equal microbatches)")
  model_vocab, data_vocab = model.get("vocab_size"), data.get("vocab_size")
  if _positive_ints(model_vocab, data_vocab) and model_vocab < data_vocab:
    problems.append(f"model.vocab_size={model_vocab}: must be >= data.vocab_size={data_vocab} (or 0: the data's)")
  trains_pieces = data.get("tokenizer") == "sentencepiece" and str(data.get("tokenizer_path")).startswith("train:")
  if data.get("vocab_size") == 0 and (data.get("tokenizer") == "ids" or trains_pieces):
    why = ("the ids tokenizer" if data.get("tokenizer") == "ids"
           else f"data.tokenizer_path={data.get('tokenizer_path')!r}")
    problems.append(f"data.vocab_size=0: must be >= 1 with {why} (nothing else gives the vocabulary size)")
  seq_len, sample = train.get("seq_len"), train.get("sample_tokens")
  if _positive_ints(sample) and seq_len == 1:
    problems.append("train.seq_len=1: the end-of-training sample needs a context of at least 2 tokens "
                    "(set train.sample_tokens=0, or seq_len >= 2)")
  return problems


def _warnings(c: Mapping[str, Dict[str, Any]]) -> List[str]:
  """Valid, but probably not what was meant."""
  model, opt, train = c["model"], c["opt"], c["train"]
  found = []
  steps, warmup, seq_len, context = (train.get("steps"), opt.get("warmup_steps"), train.get("seq_len"),
                                     model.get("max_seq_len"))
  if _positive_ints(steps, warmup) and warmup >= steps and opt.get("schedule") != "rsqrt_relative":
    found.append(f"opt.warmup_steps={warmup} >= train.steps={steps}: the learning rate never reaches opt.lr")
  if opt.get("lr") == 0 and opt.get("schedule") != "rsqrt_relative":
    found.append("opt.lr=0: the parameters never change")
  if _positive_ints(seq_len, context) and seq_len > context:
    found.append(f"train.seq_len={seq_len} > model.max_seq_len={context}: training works (no jaxlm model has a "
                 f"position table), but generation and the end-of-training sample see only the last {context} tokens")
  if _positive_ints(train.get("patience")) and train.get("eval_every") == 0:
    found.append(f"train.patience={train.get('patience')} with train.eval_every=0: there are no evaluations, "
                 "so early stopping never happens")
  return found


def _positive_ints(*values: Any) -> bool:
  return all(_is_integer(v) and v > 0 for v in values)


def config_problems(config: Any) -> Tuple[List[str], List[str]]:
  """(problems, warnings) of a training config (a ConfigDict or a nested mapping with the five sections)."""
  missing = [s for s in SECTIONS if not _get(config, s)[0] or not hasattr(_get(config, s)[1], "keys")]
  if missing:
    return [f"config: missing section(s) {', '.join(missing)} (a training config has {', '.join(SECTIONS)})"], []
  sections = {s: _as_dict(config[s]) for s in SECTIONS}
  problems = _model_problems(sections["model"])
  for name, rules in section_rules().items():
    problems += _section_problems(name, sections[name], rules)
  if problems:  # cross-field checks assume each field is in range
    return problems, []
  return _cross_problems(sections), _warnings(sections)


def check_config(config: Any) -> List[str]:
  """Raises ValueError listing every invalid field ('; '-separated, one line); returns warnings (valid values
  that are probably unintended, one string each) for the caller to log."""
  problems, warnings = config_problems(config)
  if problems:
    raise ValueError("; ".join(problems))
  return warnings


# ------------------------------------------------------------------------------------------ command lines
def check_args(args: Any, rules: Mapping[str, Rule]) -> None:
  """Raises ValueError naming each flag (`--top-p=1.5: must be a number in [0, 1]`) whose value breaks its
  rule; `rules` maps argparse destinations to rules, and flags left at None are not checked."""
  problems = []
  for dest, rule in rules.items():
    value = getattr(args, dest, None)
    if value is not None:
      problem = rule.problem("--" + dest.replace("_", "-"), value)
      if problem:
        problems.append(problem)
  if problems:
    raise ValueError("; ".join(problems))
