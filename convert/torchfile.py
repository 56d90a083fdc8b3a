"""PyTorch checkpoint files (`torch.save`'s zip format) read without torch and without running pickled code.

Reading: the zip holds `<archive>/data.pkl` (the object graph) and `<archive>/data/<key>` (raw storages). The
pickle is read by `unpickle.RestrictedUnpickler`; tensors come back as numpy arrays (bfloat16 via ml_dtypes,
which jax installs), classes it does not know as `InertRecord`s. Writing goes through `torch.save` itself, so
the file is exactly what the original projects' `torch.load` expects; inert records are written back under their
original global names without importing those modules.
"""
from __future__ import annotations

import collections
import errno
import os
import pickle
import types
import zipfile
from typing import Any, Dict, Tuple

import ml_dtypes
import numpy as np

from convert.errors import ConversionError
from convert.unpickle import InertRecord, restricted_loads

# torch storage class name -> numpy dtype; the storage key in the zip holds numel * itemsize bytes.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}
# torch dtype global name -> numpy dtype (they appear as `torch float32` in some pickles).
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16, "int64": np.int64,
    "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16, "short": np.int16,
    "int8": np.int8, "uint8": np.uint8, "bool": np.bool_, "complex64": np.complex64,
    "complex128": np.complex128,
}
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickled magic number of torch < 1.6 files


class _StorageType:
  """Stand-in for `torch.FloatStorage` etc.: only its element dtype matters."""

  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """One storage record: a flat array of `numel` elements."""

  def __init__(self, flat: np.ndarray, key: str):
    self.flat, self.key = flat, key


def _strided_copy(flat: np.ndarray, offset: int, size, stride, what: str) -> np.ndarray:
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or any(s < 0 for s in stride) or offset < 0:
    raise ConversionError(f"{what}: bad tensor geometry size={size} stride={stride} offset={offset}")
  last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
  if last >= flat.size:
    raise ConversionError(f"{what}: tensor of size {size} reaches element {last} of a {flat.size}-element storage")
  view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                         strides=tuple(s * flat.itemsize for s in stride), writeable=False)
  return np.array(view, order="C")  # owned, contiguous copy


class _TorchZipReader:
  """Resolves the persistent ids and tensor rebuild calls of one torch zip checkpoint."""

  def __init__(self, path: str, zf: zipfile.ZipFile, prefix: str):
    self.path, self.zf, self.prefix = path, zf, prefix
    self.storages: Dict[str, _Storage] = {}
    byteorder = prefix + "byteorder"
    self.big_endian = byteorder in zf.namelist() and zf.read(byteorder).strip() == b"big"

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
      raise ConversionError(f"{self.path}: unsupported persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise ConversionError(f"{self.path}: storage record {key!r} has unknown storage type {storage_type!r}")
    key = key.decode() if isinstance(key, bytes) else str(key)
    if key not in self.storages:
      name = f"{self.prefix}data/{key}"
      try:
        raw = self.zf.read(name)
      except KeyError:
        raise ConversionError(f"{self.path}: storage record {name!r} is missing (truncated file?)") from None
      dtype = storage_type.dtype.newbyteorder(">") if self.big_endian else storage_type.dtype
      want = int(numel) * dtype.itemsize
      if len(raw) != want:
        raise ConversionError(f"{self.path}: storage record {name!r} has {len(raw)} bytes, expected {want} "
                              f"({numel} x {storage_type.name}); the file is truncated or corrupt")
      flat = np.frombuffer(raw, dtype=dtype).astype(storage_type.dtype, copy=False)
      self.storages[key] = _Storage(flat, name)
    return self.storages[key]

  def rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
      raise ConversionError(f"{self.path}: tensor rebuilt from {type(storage).__name__}, not a storage")
    return _strided_copy(storage.flat, int(offset), size, stride, f"{self.path}: {storage.key}")

  def rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    tensor_dtype = np.dtype(dtype)
    flat = storage.flat.view(np.uint8).view(tensor_dtype)  # v3 reinterprets the untyped bytes
    return _strided_copy(flat, int(offset), size, stride, f"{self.path}: {storage.key}")

  def globals(self) -> Dict[Tuple[str, str], Any]:
    table: Dict[Tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): self.rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): self.rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): lambda data, requires_grad=False, hooks=None: data,
        ("torch._utils", "_rebuild_parameter_with_state"): lambda data, rg, hooks, state: data,
        ("torch", "Size"): tuple,
    }
    table.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})
    table.update({("torch", name): np.dtype(dt) for name, dt in _TORCH_DTYPES.items()})
    return table


def _archive_prefix(path: str, zf: zipfile.ZipFile) -> str:
  pickles = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
  if not pickles:
    raise ConversionError(f"{path}: zip archive without data.pkl: not a torch.save checkpoint")
  return pickles[0][: -len("data.pkl")]


def load(path: str) -> Any:
  """The object `torch.save` stored in `path`, with tensors as numpy arrays; runs no code from the file."""
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such checkpoint file")
  try:
    with zipfile.ZipFile(path) as zf:
      prefix = _archive_prefix(path, zf)
      reader = _TorchZipReader(path, zf, prefix)
      return restricted_loads(zf.read(prefix + "data.pkl"), extra_globals=reader.globals(),
                              persistent_load=reader.persistent_load)
  except zipfile.BadZipFile as e:
    with open(path, "rb") as f:
      head = f.read(len(_LEGACY_MAGIC))
    if head == _LEGACY_MAGIC:
      raise ConversionError(f"{path}: legacy (torch < 1.6) checkpoint format is not supported; "
                            "re-save it with a current torch") from None
    raise ConversionError(f"{path}: not a readable torch checkpoint (truncated or corrupt zip: {e})") from None
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
    if isinstance(e, ConversionError):
      raise
    raise ConversionError(f"{path}: cannot read the pickled object graph ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------------- writing
def _to_torch(obj: Any) -> Any:
  """numpy arrays -> torch tensors, recursively; containers keep their type (and an OrderedDict its
  `_metadata`, which torch's state_dict() attaches and load_state_dict() reads)."""
  import torch
  if isinstance(obj, np.ndarray):
    array = np.ascontiguousarray(obj)
    if not array.flags.writeable:  # torch tensors share the buffer and may be written
      array = array.copy()
    if array.dtype == ml_dtypes.bfloat16:
      return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)
  if isinstance(obj, collections.OrderedDict):
    out = collections.OrderedDict((k, _to_torch(v)) for k, v in obj.items())
    if hasattr(obj, "_metadata"):
      out._metadata = obj._metadata
    return out
  if isinstance(obj, dict):
    return {k: _to_torch(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_to_torch(v) for v in obj)
  return obj


class _RecordPickler(pickle._Pickler):
  """Pure-Python pickler that writes an InertRecord's class as its original global, importing nothing."""

  def save_global(self, obj, name=None):
    if isinstance(obj, type) and issubclass(obj, InertRecord) and obj is not InertRecord:
      self.write(pickle.GLOBAL + f"{obj.global_module}\n{obj.global_name}\n".encode("utf-8"))
      self.memoize(obj)
      return
    super().save_global(obj, name)


_PICKLE_MODULE = types.SimpleNamespace(__name__="convert_record_pickle", Pickler=_RecordPickler)


def save(obj: Any, path: str) -> None:
  """torch.save(obj, path) after turning numpy arrays into tensors (needs torch: the `convert` extra)."""
  try:
    import torch
  except ImportError:
    raise ConversionError("writing a PyTorch checkpoint needs torch (pip install jaxlm[convert])") from None
  try:
    torch.save(_to_torch(obj), path, pickle_module=_PICKLE_MODULE)
  except RuntimeError as e:  # torch's C++ writer loses the errno of a failed write (disk full, quota, I/O)
    if "inline_container" not in str(e):
      raise
    raise OSError(errno.EIO, f"writing failed ({str(e).strip()})", path) from e


def state_dict(items, module_paths) -> "collections.OrderedDict":
  """An OrderedDict like nn.Module.state_dict(): tensors in order plus `_metadata` with one
  {'version': 1} entry per module path ('' is the root), which is what torch writes for these models."""
  out = collections.OrderedDict(items)
  out._metadata = collections.OrderedDict((p, {"version": 1}) for p in module_paths)
  return out


def empty_optimizer_state(optimizer: Any, n_params: int):
  """An optimizer state_dict with its per-parameter moments dropped (they do not survive a conversion) and
  its param list renumbered for `n_params` parameters; None when `optimizer` is not a state_dict."""
  if not (isinstance(optimizer, dict) and isinstance(optimizer.get("param_groups"), list)):
    return None
  groups = [dict(g) for g in optimizer["param_groups"]]
  if len(groups) == 1:
    groups[0]["params"] = list(range(n_params))
  return {"state": {}, "param_groups": groups}
