"""Paths that may be local or remote (`gs://bucket/run`): every workdir file goes through here.

Local paths are made absolute (Orbax wants that); remote URLs are kept exactly as given (`os.path.abspath`
would turn `gs://b/r` into `/cwd/gs:/b/r`). Reads and writes use etils.epath, the layer Orbax itself uses, so a
workdir on Cloud Storage works wherever `gcsfs` (or TensorFlow's gfile) is installed. Writes go to a temporary
name and are renamed into place, so a reader never sees half a file.
"""
from __future__ import annotations

import json
import os
import tempfile
import uuid
from typing import Any

from etils import epath


def is_remote(path: str) -> bool:
  return "://" in os.fspath(path)


def absolute(path: str) -> str:
  """An absolute local path, or the remote URL unchanged."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
  return str(epath.Path(base).joinpath(*parts)) if is_remote(base) else os.path.join(base, *parts)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_text(path: str) -> str:
  return epath.Path(path).read_text(encoding="utf-8")


def write_bytes_atomic(path: str, data: bytes) -> None:
  target = epath.Path(path)
  tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"  # two writers never share a temporary
  try:
    tmp.write_bytes(data)
    tmp.replace(target)
  except BaseException:
    try:
      tmp.unlink()
    except OSError:
      pass
    raise


def write_text_atomic(path: str, text: str) -> None:
  write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def copy_tree(src: str, dst: str) -> None:
  """Copies the files of directory `src` (recursively) into `dst`, local or remote on either side."""
  src_path, dst_path = epath.Path(src), epath.Path(dst)
  dst_path.mkdir(parents=True, exist_ok=True)
  for item in src_path.iterdir():
    if item.is_dir():
      copy_tree(str(item), str(dst_path / item.name))
    else:
      write_bytes_atomic(str(dst_path / item.name), item.read_bytes())


def local_dir(path: str) -> str:
  """`path` itself when local; else a fresh local copy of the remote directory (kept for the process's life,
  since a tokenizer may refer to its files)."""
  if not is_remote(path) or not exists(path):
    return path
  local = tempfile.mkdtemp(prefix="jaxlm-")
  copy_tree(path, local)
  return local
