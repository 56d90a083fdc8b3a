"""Model architectures. Importing this package registers each one with config_base."""
from jaxlm.models import decoder
from jaxlm.models import hrm
from jaxlm.models import hrm_text1
from jaxlm.models.config_base import build_model, register_module

register_module("decoder", decoder.Decoder)
register_module("hrm", hrm.HRM)
register_module("hrm_text1", hrm_text1.HRMText1)


def apply_reasoning(config, module, mode=None, n_cycles=None, t_steps=None):
  """(config, module) with an HRM reasoning mode / N cycles / T steps applied; an error for other archs."""
  if mode is None and n_cycles is None and t_steps is None:
    return config, module
  arch = getattr(config, "arch", "?")
  if arch != "hrm":
    raise ValueError(f"--mode/--n-cycles/--t-steps apply to HRM models (arch 'hrm'); this model is {arch!r}")
  config = hrm.apply_reasoning_mode(config, mode=mode, n_cycles=n_cycles, t_steps=t_steps)
  return config, type(module)(config)


__all__ = ["apply_reasoning", "build_model", "decoder", "hrm", "hrm_text1"]
