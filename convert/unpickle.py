"""A pickle reader that never runs code from the file.

Pickles name the callables that rebuild their objects ("os system", "config TrainingConfig"). A plain
unpickler imports and calls them, so a checkpoint can run anything. `RestrictedUnpickler` resolves only an
allowlist of harmless constructors (plain containers, and whatever the caller adds, e.g. tensor rebuilders);
every other global becomes an `InertRecord` class made on the spot, without importing anything. Calling such a
class, or building an instance of it, only stores the arguments and state it was given.
"""
from __future__ import annotations

import _compat_pickle
import collections
import copyreg
import io
import pickle
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np


class _InertMeta(type):
  """Marks records made by calling the class (REDUCE) apart from those made by __new__ (NEWOBJ)."""

  def __call__(cls, *args, **kwargs):
    record = cls.__new__(cls, *args, **kwargs)
    record.how = "call"
    return record


class InertRecord(metaclass=_InertMeta):
  """What the file said about an object of a class that was not imported: its global name, args, state."""
  global_module = ""
  global_name = ""

  def __new__(cls, *args, **kwargs):
    record = object.__new__(cls)
    record.args, record.kwargs, record.state, record.how = args, kwargs, None, "new"
    return record

  def __setstate__(self, state):  # BUILD: keep the state instead of applying it
    self.state = state

  @property
  def qualname(self) -> str:
    return f"{self.global_module}.{self.global_name}"

  def __reduce_ex__(self, protocol):
    # Pickling a record writes the same opcodes the original object produced (see torchfile's pickler).
    if self.how == "new":
      return (copyreg.__newobj__, (type(self),) + tuple(self.args), self.state)
    return (type(self), tuple(self.args), self.state)

  def __eq__(self, other):
    return (isinstance(other, InertRecord) and self.qualname == other.qualname and self.how == other.how
            and self.args == other.args and self.kwargs == other.kwargs and self.state == other.state)

  __hash__ = None

  def __repr__(self):
    state = f", state={self.state!r}" if self.state is not None else ""
    return f"<inert {self.qualname} args={self.args!r}{state}>"


_INERT_CLASSES: Dict[Tuple[str, str], type] = {}


def inert_class(module: str, name: str) -> type:
  """The placeholder class for the global `module.name` (one per name, so records compare equal)."""
  key = (module, name)
  if key not in _INERT_CLASSES:
    _INERT_CLASSES[key] = _InertMeta(name, (InertRecord,), {
        "global_module": module, "global_name": name, "__module__": module, "__qualname__": name})
  return _INERT_CLASSES[key]


def _latin1_bytes(text, encoding="latin1"):
  # Protocol-2 pickles written by Python 3 spell bytes as _codecs.encode(str, 'latin1').
  if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
    raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
  return text.encode("latin1")


def _numpy_dtype(spec, align=False, copy=False):
  if not isinstance(spec, str):
    raise pickle.UnpicklingError(f"numpy.dtype({spec!r}) is not allowed")
  return np.dtype(spec)


def _numpy_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
    raise pickle.UnpicklingError("numpy scalar with an object dtype is not allowed")
  return np.frombuffer(data, dtype=dtype)[0]


def _numpy_reconstruct(subtype, shape, dtype_code):
  # ndarray.__setstate__ (called by BUILD) then fills it from already-unpickled, therefore safe, data.
  if subtype is not np.ndarray:
    raise pickle.UnpicklingError("numpy _reconstruct of a subclass of ndarray is not allowed")
  return np.ndarray.__new__(np.ndarray, shape, np.uint8)


def _numpy_frombuffer(buffer, dtype, shape, order):
  # Protocol-5 pickles of arrays: raw bytes plus dtype/shape.
  if not isinstance(dtype, np.dtype) or dtype.hasobject or order not in ("C", "F"):
    raise pickle.UnpicklingError("numpy _frombuffer with an object dtype is not allowed")
  return np.frombuffer(bytes(buffer), dtype=dtype).reshape(shape, order=order).copy(order=order)


# Globals every reader may resolve: constructors of plain data that cannot reach the file system or code.
SAFE_GLOBALS: Dict[Tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
}


class RestrictedUnpickler(pickle.Unpickler):
  """pickle.Unpickler whose globals come from an allowlist; anything else loads as an InertRecord.

  extra_globals: more (module, name) -> object entries (e.g. tensor rebuilders).
  persistent_load: resolver for persistent ids (torch storages); without one they are an error.
  """

  def __init__(self, file, *, extra_globals: Optional[Mapping[Tuple[str, str], Any]] = None,
               persistent_load: Optional[Callable[[Any], Any]] = None):
    super().__init__(file)
    self._globals = {**SAFE_GLOBALS, **(extra_globals or {})}
    self._persistent_load = persistent_load

  def find_class(self, module, name):
    # Protocol <= 2 pickles use Python 2 names ("__builtin__ set"); map them as pickle's fix_imports does.
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
      module = _compat_pickle.IMPORT_MAPPING[module]
    if (module, name) in self._globals:
      return self._globals[(module, name)]
    return inert_class(module, name)

  def persistent_load(self, pid):
    if self._persistent_load is None:
      raise pickle.UnpicklingError(f"persistent id {pid!r} found but this format has no external records")
    return self._persistent_load(pid)


def restricted_loads(data: bytes, **kwargs) -> Any:
  """Unpickles `data` without executing anything it names; see RestrictedUnpickler for kwargs."""
  return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()
