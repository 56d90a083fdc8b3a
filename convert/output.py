"""Where a conversion writes, and how a failed write leaves --out as it was and says which path failed.

Writing goes through jaxlm.modeldir.staged_output (a hidden staging folder beside the destination, renamed into
place at the end). `writing()` wraps that: a file-system error names the destination (not the hidden staging copy,
and not nothing: a failed write() carries no file name), and folders created on the way are removed again.
"""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Dict, Iterator, List, Optional

from convert.errors import ConversionError


def names_directory(out: str) -> bool:
  """--out ends with a path separator, or is an existing directory."""
  return out.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)) or os.path.isdir(out)


def is_empty_directory(path: str) -> bool:
  return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def refuse_existing(paths, overwrite: bool) -> None:
  """Nothing is replaced without --overwrite."""
  for path in paths:
    if os.path.lexists(path) and not overwrite:
      raise ConversionError(f"{path} already exists (pass --overwrite to replace it)")


def _missing_folders(path: str) -> List[str]:
  """The folders above `path` that do not exist yet, outermost first; refuses a path under a file."""
  missing = []
  folder = os.path.dirname(os.path.abspath(path))
  while not os.path.lexists(folder):
    missing.insert(0, folder)
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), folder)
  return missing


def _public_path(path: Optional[str], out: str) -> str:
  """The path a user knows for a path inside the staging folder of `out` (None: `out` itself). staged_output
  names that folder `.<name of out>.tmp-<random>`, beside `out`, and writes `out`'s copy inside it."""
  if not path:
    return out
  parent, base = os.path.split(out)
  stage_prefix = os.path.join(parent, f".{base}.tmp-")
  path = os.path.abspath(path)
  if not path.startswith(stage_prefix):
    return path
  inside = path[len(stage_prefix):].partition(os.sep)[2]  # '' (the staging folder), or '<base>[/...]'
  return os.path.join(parent, inside) if inside else parent


@contextlib.contextmanager
def writing(out: str) -> Iterator[None]:
  """Wraps everything that writes `out` (a file or folder)."""
  out = os.path.abspath(out)
  created = _missing_folders(out)
  try:
    yield
  except BaseException as e:
    for folder in reversed(created):  # innermost first; only while empty
      with contextlib.suppress(OSError):
        os.rmdir(folder)
    if isinstance(e, OSError) and e.errno is not None:
      raise OSError(e.errno, e.strerror or os.strerror(e.errno), _public_path(e.filename, out)) from e
    raise


def place(files: Dict[str, Optional[bytes]], stage: str) -> None:
  """Writes each {path: bytes} into `stage` first, then renames them into place; a None value removes an old file at
  that path. Called inside the staging block, so a failure here leaves the checkpoint itself unwritten too."""
  staged = {}
  for path, data in files.items():
    if data is not None:
      staged[path] = os.path.join(stage, "beside-" + os.path.basename(path))
      try:
        with open(staged[path], "wb") as f:
          f.write(data)
      except OSError as e:
        raise OSError(e.errno, e.strerror, path) from e
  for path, data in files.items():
    if data is None:
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    else:
      os.replace(staged[path], path)
