"""Lossless JSON for the non-tensor entries of a checkpoint (step, config dicts, optimizer hyper-parameters,
pickled config objects), so a model directory's config.json can carry them and jax2torch can write them back.

Plain JSON loses tuples, non-string dict keys, OrderedDict and inert records; those get a one-key tag object:
{"__tuple__": [...]}, {"__items__": [[k, v], ...]}, {"__odict__": [[k, v], ...]}, {"__bytes__": "hex"},
{"__record__": {"global": "module:name", "how", "args", "kwargs", "state"}}.
Arrays (tensors) are refused: they belong in the params, not in the metadata.
"""
from __future__ import annotations

import collections
from typing import Any

import numpy as np

from convert.errors import ConversionError
from convert.unpickle import InertRecord, inert_class

_TAGS = ("__tuple__", "__items__", "__odict__", "__bytes__", "__record__")


def encode(obj: Any, where: str = "") -> Any:
  """A JSON-serialisable form of `obj`; `where` names the entry in errors."""
  if obj is None or isinstance(obj, (bool, str)):
    return obj
  if isinstance(obj, np.ndarray):
    raise ConversionError(f"{where or 'value'}: a tensor of shape {obj.shape} cannot go into JSON metadata")
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, (int, float)):
    return obj
  if isinstance(obj, tuple):
    return {"__tuple__": [encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
  if isinstance(obj, list):
    return [encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
  if isinstance(obj, (bytes, bytearray)):
    return {"__bytes__": bytes(obj).hex()}
  if isinstance(obj, collections.OrderedDict):
    return {"__odict__": [[encode(k, where), encode(v, f"{where}.{k}")] for k, v in obj.items()]}
  if isinstance(obj, dict):
    if all(isinstance(k, str) for k in obj) and not any(k in _TAGS for k in obj):
      return {k: encode(v, f"{where}.{k}") for k, v in obj.items()}
    return {"__items__": [[encode(k, where), encode(v, f"{where}.{k}")] for k, v in obj.items()]}
  if isinstance(obj, InertRecord):
    return {"__record__": {"global": f"{obj.global_module}:{obj.global_name}", "how": obj.how,
                           "args": encode(list(obj.args), f"{where}.args"),
                           "kwargs": encode(dict(obj.kwargs), f"{where}.kwargs"),
                           "state": encode(obj.state, f"{where}.state")}}
  raise ConversionError(f"{where or 'value'}: cannot store a {type(obj).__name__} in JSON metadata")


def decode(obj: Any) -> Any:
  """Inverse of `encode`."""
  if isinstance(obj, list):
    return [decode(v) for v in obj]
  if not isinstance(obj, dict):
    return obj
  if len(obj) == 1:
    (tag, value), = obj.items()
    if tag == "__tuple__":
      return tuple(decode(v) for v in value)
    if tag == "__items__":
      return {decode(k): decode(v) for k, v in value}
    if tag == "__odict__":
      return collections.OrderedDict((decode(k), decode(v)) for k, v in value)
    if tag == "__bytes__":
      return bytes.fromhex(value)
    if tag == "__record__":
      module, name = value["global"].split(":", 1)
      cls = inert_class(module, name)
      record = cls.__new__(cls, *decode(value["args"]), **decode(value["kwargs"]))
      record.how, record.state = value["how"], decode(value["state"])
      return record
  return {k: decode(v) for k, v in obj.items()}
