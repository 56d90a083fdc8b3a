"""safetensors files: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then raw little-endian tensor bytes. Read here directly (bfloat16 through ml_dtypes, and errors that name the
tensor and the file); written with the `safetensors` package.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Dict, Mapping, Optional

import ml_dtypes
import numpy as np

from convert.errors import ConversionError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def load(path: str) -> Dict[str, np.ndarray]:
  """name -> numpy array (owned copies), in file order."""
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such safetensors file")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ConversionError(f"{path}: truncated safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise ConversionError(f"{path}: header of {n} bytes does not fit in a {size}-byte file (truncated?)")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ConversionError(f"{path}: unreadable safetensors header ({e})") from None
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info.get("dtype") not in _DTYPES:
      raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
    dtype = np.dtype(_DTYPES[info["dtype"]])
    shape = tuple(int(s) for s in info["shape"])
    start, end = (int(x) for x in info["data_offsets"])
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - start != want:
      raise ConversionError(f"{path}: tensor {name!r} spans {end - start} bytes, its shape {shape} needs {want}")
    if end > len(data):
      raise ConversionError(f"{path}: tensor {name!r} ends at byte {end} of a {len(data)}-byte data section "
                            "(truncated file)")
    # byte order: safetensors is little-endian, as are all hosts jax runs on
    out[name] = np.frombuffer(data, dtype=dtype, count=want // dtype.itemsize, offset=start).reshape(shape).copy()
  return out


def save(tensors: Mapping[str, np.ndarray], path: str, metadata: Optional[Mapping[str, str]] = None) -> None:
  try:
    from safetensors import SafetensorError
    from safetensors.numpy import save_file
  except ImportError:
    raise ConversionError("writing safetensors needs the safetensors package (pip install jaxlm[convert])") from None
  try:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata=dict(metadata or {}))
  except SafetensorError as e:  # "... I/O error: No space left on device (os error 28)": an OSError naming path
    code = re.search(r"\(os error (\d+)\)", str(e))
    if code is None:
      raise
    raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), path) from e
