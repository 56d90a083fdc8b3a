"""Typed model configs and the registry that maps `model.arch` to a (config class, module class) pair.

Each architecture module registers itself, so nothing dispatches over model types in an if-chain.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Tuple, Type

_REGISTRY: Dict[str, Tuple[type, type]] = {}


def register(arch: str, module_cls: type | None = None) -> Callable[[type], type]:
  """Class decorator for a config dataclass; the module class is attached by `register_module`."""
  def wrap(config_cls):
    config_cls.arch = arch
    _REGISTRY[arch] = (config_cls, _REGISTRY.get(arch, (None, module_cls))[1])
    return config_cls
  return wrap


def register_module(arch: str, module_cls: type) -> None:
  config_cls = _REGISTRY.get(arch, (None, None))[0]
  _REGISTRY[arch] = (config_cls, module_cls)


# Fields that change how a model computes but not its parameters: a checkpoint resumes across them.
COMPUTE_ONLY_FIELDS = ("dtype", "remat", "remat_policy", "attention_impl", "attention_block", "xent_chunk",
                       "scan_unroll")


def auto_dtype() -> str:
  """model.dtype='auto': bfloat16 on GPU/TPU (float32 parameters, softmax, norms and loss), float32 on CPU."""
  import jax
  return "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"


@dataclasses.dataclass(frozen=True)
class ModelConfigBase:
  """Base for model configs: construction from a plain dict with a clear error on unknown fields."""
  arch = "base"

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]):
    values = {k: v for k, v in dict(values).items() if k not in ("arch", "family")}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown model config field(s) {unknown} for arch {cls.arch!r}; known fields: {sorted(known)}")
    cooked = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    if cooked.get("dtype") == "auto":
      cooked["dtype"] = auto_dtype()
    config = cls(**cooked)
    config.validate()
    return config

  def validate(self) -> None:
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.type in ("int", int) and isinstance(v, int) and v < 0:
        raise ValueError(f"model.{f.name} must be >= 0, got {v}")

  def to_dict(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    d["arch"] = self.arch
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)


def build_model(model_cfg: Mapping[str, Any]):
  """Returns (typed config, flax module) for a `model` config section or a loaded config.json."""
  import jaxlm.models  # noqa: F401  (registers every architecture)
  arch = dict(model_cfg).get("arch", "decoder")
  if arch not in _REGISTRY or _REGISTRY[arch][1] is None:
    raise ValueError(f"unknown model.arch {arch!r}; known: {sorted(_REGISTRY)}")
  config_cls, module_cls = _REGISTRY[arch]
  config = config_cls.from_dict(model_cfg)
  return config, module_cls(config)
