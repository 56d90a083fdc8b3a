"""RoPE buffers, the state-dict schema check and source dtypes (the tensor transforms are in convert/table.py)."""
from __future__ import annotations

import collections
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from convert.errors import ConversionError


# ---------------------------------------------------------------------------------- RoPE pair order
def interleaved_to_half(head_dim: int) -> np.ndarray:
  """Index map p with x_half = x_interleaved[..., p]: pairs (2i, 2i+1) become (i, i + head_dim/2)."""
  return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
  """float32 1/theta^(2i/H), for checking a checkpoint's RoPE buffer (writers compute it with torch)."""
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  return (1.0 / (np.float64(theta) ** exponent.astype(np.float64))).astype(np.float32)


def rope_theta_from_buffer(inv_freq: np.ndarray, head_dim: int, key: str, file: str) -> float:
  """The theta whose table a saved inv_freq buffer holds (checked entry by entry)."""
  if inv_freq.shape != (head_dim // 2,) or head_dim < 4:
    raise ConversionError(f"{file}: RoPE buffer {key} has shape {inv_freq.shape}, expected ({head_dim // 2},)")
  theta = float(inv_freq[1]) ** (-head_dim / 2.0)
  if abs(theta - round(theta)) < 1e-3 * theta:
    theta = float(round(theta))
  if not np.allclose(rope_inv_freq(head_dim, theta), inv_freq, rtol=1e-5, atol=0):
    raise ConversionError(f"{file}: RoPE buffer {key} is not a 1/theta^(2i/{head_dim}) table "
                          f"(nearest theta {theta:g}); jaxlm cannot represent it")
  return theta


# ---------------------------------------------------------------------------------- schema check
def shared_rope_theta(state: Mapping[str, np.ndarray], keys: Sequence[str], head_dim: int, file: str,
                      theta_of: Optional[Callable[[np.ndarray, int, str, str], float]] = None) -> float:
  """The one RoPE theta that every per-layer inv_freq buffer in `keys` holds (an error names the one that differs)."""
  theta_of = theta_of or rope_theta_from_buffer
  theta = None
  for key in keys:
    if key not in state:
      raise ConversionError(f"{file}: missing tensor {key!r}")
    t = theta_of(state[key], head_dim, key, file)
    if theta is not None and t != theta:
      raise ConversionError(f"{file}: {key} uses RoPE theta {t:g}, {keys[0]} uses {theta:g}")
    theta = t
  return theta


def check_state_dict(state: Mapping[str, np.ndarray], schema: Mapping[str, Tuple[int, ...]],
                     file: str) -> Dict[str, np.ndarray]:
  """Checks keys and shapes against the schema; returns float32 copies in schema order.

  Errors name the first missing / unexpected / mis-shaped key and the file.
  """
  if not isinstance(state, Mapping):
    raise ConversionError(f"{file}: expected a state_dict (a mapping of tensors), found {type(state).__name__}")
  missing = [k for k in schema if k not in state]
  if missing:
    raise ConversionError(f"{file}: missing tensor {missing[0]!r}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  unexpected = [k for k in state if k not in schema]
  if unexpected:
    raise ConversionError(f"{file}: unexpected key {unexpected[0]!r}"
                          + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                          + "; the checkpoint does not match this family's architecture")
  out = collections.OrderedDict()
  for key, shape in schema.items():
    value = state[key]
    if not isinstance(value, np.ndarray):
      raise ConversionError(f"{file}: {key!r} is a {type(value).__name__}, not a tensor")
    if tuple(value.shape) != tuple(shape):
      raise ConversionError(f"{file}: tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
      raise ConversionError(f"{file}: tensor {key!r} has dtype {value.dtype}, expected a float dtype")
    out[key] = value
  return out


def source_dtypes(state: Mapping[str, np.ndarray]) -> Dict[str, str]:
  """key -> dtype name for the tensors that are not float32 (so an export can restore them exactly)."""
  return {k: v.dtype.name for k, v in state.items() if v.dtype != np.float32}


def count_by_prefix(keys: Sequence[str], prefix: str, suffix: str) -> int:
  """Number of layers i with a key `{prefix}{i}{suffix}`: layers must be numbered 0..n-1."""
  found = set()
  for key in keys:
    if key.startswith(prefix) and key.endswith(suffix):
      middle = key[len(prefix):len(key) - len(suffix)]
      if middle.isdigit():
        found.add(int(middle))
  n = len(found)
  if found != set(range(n)):
    raise ConversionError(f"layer keys {prefix}<i>{suffix} are not numbered 0..{n - 1}: found {sorted(found)}")
  return n


def torch_rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
  """The RoPE buffer exactly as HROM and YingGem compute it in torch (bit-exact on export)."""
  import torch
  return (1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))).numpy()


def np_dtype(name: str) -> np.dtype:
  import ml_dtypes
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def to_dtypes(items, dtypes: Optional[Mapping[str, str]]):
  """(key, array) pairs cast back to the dtypes a source file had (float32 unless recorded otherwise)."""
  dtypes = dtypes or {}
  return [(k, np.asarray(v).astype(np_dtype(dtypes.get(k, "float32")), copy=False)) for k, v in items]
