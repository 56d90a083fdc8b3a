"""jaxlm.validate: every shipped config passes; each out-of-range value is refused with its field and range."""
import glob
import os

import jax
import ml_collections
import pytest

from jaxlm import optim, validate
from jaxlm.config_defaults import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
TINY = os.path.join(ROOT, "configs", "yinggem.py:tiny")


def tiny(**changes):
  """The yinggem tiny config with `section.field` changes, as a ConfigDict (a plain dict first, so that a
  change may also break the field's type, as a hand-written config can)."""
  values = load_config(TINY).to_dict()
  for path, value in changes.items():
    section, field = path.split("__")
    values[section][field] = value
  return ml_collections.ConfigDict(values)


def refused(config) -> str:
  with pytest.raises(ValueError) as info:
    validate.check_config(config)
  message = str(info.value)
  assert "\n" not in message
  return message


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize("variant", ["", "original", "tiny"])
def test_every_shipped_config_and_variant_passes(path, variant):
  warnings = validate.check_config(load_config(f"{path}:{variant}" if variant else path))
  assert isinstance(warnings, list)


@pytest.mark.parametrize("change,message", [
    # what users hit: ZeroDivisionError, or a run that "finishes" with exit 0
    (dict(train__save_every=0), "train.save_every=0: must be an integer >= 1"),
    (dict(train__log_every=0), "train.log_every=0: must be an integer >= 1"),
    (dict(opt__grad_accum=0), "opt.grad_accum=0: must be an integer >= 1"),
    (dict(train__steps=-5), "train.steps=-5: must be an integer >= 1"),
    (dict(train__steps=2.5), "train.steps=2.5: must be an integer >= 1"),
    (dict(train__batch_size="8"), "train.batch_size='8': must be an integer >= 1"),
    (dict(opt__lr=-1e-3), "opt.lr=-0.001: must be a number >= 0"),
    (dict(opt__lr=float("nan")), "opt.lr=nan: must be a number >= 0"),
    (dict(data__val_fraction=1.0), "data.val_fraction=1.0: must be a number in [0, 1)"),
    (dict(data__val_fraction=-0.1), "data.val_fraction=-0.1: must be a number in [0, 1)"),
    (dict(mesh__data=0), "mesh.data=0: must be -1 (every remaining device) or an integer >= 1"),
    (dict(mesh__model=-2), "mesh.model=-2: must be -1 (every remaining device) or an integer >= 1"),
    (dict(train__eval_every=-1), "train.eval_every=-1: must be an integer >= 0 (0 = off)"),
    (dict(train__patience=-1), "train.patience=-1: must be an integer >= 0 (0 = off)"),
    (dict(train__sample_tokens=-1), "train.sample_tokens=-1: must be an integer >= 0 (0 = none)"),
    (dict(train__keep_checkpoints=0), "train.keep_checkpoints=0: must be an integer >= 1"),
    (dict(train__seed=2 ** 32), "train.seed=4294967296: must be an integer in [0, 4294967296)"),
    (dict(train__sample_temperature=-1.0), "train.sample_temperature=-1.0: must be a number >= 0"),
    (dict(train__progress="yes"), "train.progress='yes': must be true or false"),
    (dict(opt__b1=1.0), "opt.b1=1.0: must be a number in [0, 1)"),
    (dict(opt__b2=-0.5), "opt.b2=-0.5: must be a number in [0, 1)"),
    (dict(opt__eps=0.0), "opt.eps=0.0: must be a number > 0"),
    (dict(opt__weight_decay=-0.1), "opt.weight_decay=-0.1: must be a number >= 0"),
    (dict(opt__clip_norm=-1.0), "opt.clip_norm=-1.0: must be a number >= 0 (0 = off)"),
    (dict(opt__min_lr_ratio=1.5), "opt.min_lr_ratio=1.5: must be a number in [0, 1]"),
    (dict(opt__warmup_steps=-1), "opt.warmup_steps=-1: must be an integer >= 0"),
    (dict(opt__name="sgd"), "opt.name='sgd': must be one of 'adamw', 'adafactor'"),
    (dict(opt__schedule="step"), "opt.schedule='step': must be one of 'cosine', 'linear', 'constant'"),
    (dict(opt__weight_decay_on="some"), "opt.weight_decay_on='some': must be one of 'matrices', 'all'"),
    (dict(data__packing="random"), "data.packing='random': must be one of 'documents', 'padded', 'windows'"),
    (dict(data__format="csv"), "data.format='csv': must be one of"),
    (dict(data__tokenizer="bpe"), "data.tokenizer='bpe': must be one of"),
    (dict(data__eval_batches=-1), "data.eval_batches=-1: must be an integer >= 0 (0 = all)"),
    (dict(train__on_nonfinite="ignore"), "train.on_nonfinite='ignore': must be one of 'stop', 'skip'"),
    # the model: ranges its config class leaves open, then the class's own rules
    (dict(model__d_model=0), "model.d_model=0: must be an integer >= 1"),
    (dict(model__n_layers=0), "model.n_layers=0: must be an integer >= 1"),
    (dict(model__max_seq_len=1), "model.max_seq_len=1: must be an integer >= 2"),
    (dict(model__norm_eps=0.0), "model.norm_eps=0.0: must be a number > 0"),
    (dict(model__dropout=1.0), "model.dropout=1.0: must be a number in [0, 1)"),
    (dict(model__attention_window=[64, -1, 0, 0]), "model.attention_window=[64, -1, 0, 0]: must be an integer >= 0"),
    (dict(model__dtype="int8"), "model.dtype='int8': must be one of 'auto', 'float32', 'bfloat16', 'float16'"),
    (dict(model__n_layers=2.5), "model.n_layers=2.5: must be an integer >= 1"),
    (dict(model__causal=1), "model.causal=1: must be true or false"),
    (dict(model__n_heads=3), "model.n_heads=3 does not divide model.d_model=128"),
    (dict(model__norm="batch"), "model.norm must be 'rms' or 'layer'"),
    (dict(model__n_hidden=7), r"unknown model config field(s) ['n_hidden']"),
    (dict(model__arch="mamba"), "model.arch='mamba': must be one of 'decoder', 'hrm', 'hrm_text1'"),
    # fields that fit alone but not together
    (dict(opt__grad_accum=5), "train.batch_size=12 is not divisible by opt.grad_accum=5"),
    (dict(model__vocab_size=50, data__vocab_size=65), "model.vocab_size=50: must be >= data.vocab_size=65"),
    (dict(data__tokenizer="ids"), "data.vocab_size=0: must be >= 1 with the ids tokenizer"),
    (dict(train__seq_len=1), "train.seq_len=1: the end-of-training sample needs a context of at least 2 tokens"),
], ids=lambda v: "-".join(f"{k}={v}" for k, v in v.items()) if isinstance(v, dict) else None)
def test_each_bad_value_is_refused_with_its_field_and_range(change, message):
  assert message in refused(tiny(**change))


def test_every_problem_is_reported_in_one_line():
  message = refused(tiny(train__save_every=0, train__log_every=0, opt__lr=-1.0, mesh__fsdp=0,
                         data__val_fraction=2.0))
  assert message.split("; ") == [
      "data.val_fraction=2.0: must be a number in [0, 1)", "opt.lr=-1.0: must be a number >= 0",
      "train.save_every=0: must be an integer >= 1", "train.log_every=0: must be an integer >= 1",
      "mesh.fsdp=0: must be -1 (every remaining device) or an integer >= 1"]


def test_plain_mappings_missing_sections_and_fields():
  values = load_config(TINY).to_dict()
  assert validate.check_config(values) == []  # a config.json's "config" is a plain mapping
  del values["train"]["steps"]
  assert "train.steps: missing (must be an integer >= 1)" in refused(values)
  del values["mesh"]
  assert refused(values).startswith("config: missing section(s) mesh")


def test_warnings_are_not_errors():
  assert validate.check_config(tiny(opt__warmup_steps=3000)) == [
      "opt.warmup_steps=3000 >= train.steps=2000: the learning rate never reaches opt.lr"]
  warnings = validate.check_config(tiny(train__seq_len=128))
  assert warnings[0].startswith("train.seq_len=128 > model.max_seq_len=64: training works")
  assert validate.check_config(tiny(train__patience=3, train__eval_every=0)) == [
      "train.patience=3 with train.eval_every=0: there are no evaluations, so early stopping never happens"]
  assert validate.check_config(tiny(opt__lr=0.0)) == ["opt.lr=0: the parameters never change"]
  # Adafactor's relative step ignores lr and warmup.
  assert validate.check_config(tiny(opt__schedule="rsqrt_relative", opt__lr=0.0, opt__warmup_steps=5000)) == []


def test_optimizer_enumerations_are_what_optim_builds():
  """The opt rules list what jaxlm.optim accepts: each value builds, a value outside is refused by both."""
  rules = validate.section_rules()["opt"]
  base = load_config(TINY).opt
  for field in ("name", "schedule", "weight_decay_on"):
    for value in rules[field].choices:
      optim.make_optimizer(ml_collections.ConfigDict({**base.to_dict(), field: value}), 100, param_names={})
    with pytest.raises(ValueError):
      optim.make_optimizer(ml_collections.ConfigDict({**base.to_dict(), field: "bogus"}), 100, param_names={})


def test_checking_compiles_nothing(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("check_config must not trace or compile")
  for name in ("jit", "eval_shape", "make_jaxpr"):
    monkeypatch.setattr(jax, name, refuse)
  for path in CONFIGS:
    validate.check_config(load_config(path))


def test_command_line_values_are_named_as_flags():
  args = type("Args", (), {"top_p": 1.5, "max_new_tokens": 0, "seed": None})()
  rules = {"top_p": validate.number(0, 1, note="1 = off"), "max_new_tokens": validate.integer(1),
           "seed": validate.SEED}
  with pytest.raises(ValueError) as info:
    validate.check_args(args, rules)
  assert str(info.value) == ("--top-p=1.5: must be a number in [0, 1] (1 = off); "
                             "--max-new-tokens=0: must be an integer >= 1")
