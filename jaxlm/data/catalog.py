"""TFDS catalog datasets as corpora: `tfds:NAME[/CONFIG][:VERSION]` -> records, read through `tfds.data_source`.

jaxlm never downloads: the dataset must already be prepared (ArrayRecord) under `data.tfds_data_dir`. It is
found by its directory (`NAME/CONFIG/VERSION/dataset_info.json`), never through TFDS's download or GCS lookups,
so a missing dataset is a one-line error at once instead of minutes of network retries.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Tuple

PREFIX = "tfds:"
DEFAULT_DATA_DIR = os.path.join("~", "tensorflow_datasets")


def is_catalog(spec: str) -> bool:
  return str(spec).startswith(PREFIX)


def parse(spec: str) -> Tuple[str, str, str]:
  """'tfds:c4/en:3.1.0' -> ('c4', 'en', '3.1.0'); config and version '' when not given."""
  body = spec[len(PREFIX):]
  name_config, _, version = body.partition(":")
  name, _, config = name_config.partition("/")
  if not name or "/" in config:
    raise ValueError(f"data.corpus={spec!r}: expected tfds:NAME[/CONFIG][:VERSION]")
  return name, config, version


def dataset_dir(spec: str, data_dir: str) -> str:
  """The prepared dataset's directory (the newest version when none is named), or a one-line FileNotFoundError."""
  name, config, version = parse(spec)
  data_dir = os.path.expanduser(data_dir or DEFAULT_DATA_DIR)
  parent = os.path.join(data_dir, name, config) if config else os.path.join(data_dir, name)
  versions = [version] if version else sorted(
      (v for v in (os.listdir(parent) if os.path.isdir(parent) else []) if _is_version(v)),
      key=lambda v: tuple(int(x) for x in v.split(".")))
  prepared = [v for v in versions if os.path.isfile(os.path.join(parent, v, "dataset_info.json"))]
  if not prepared:
    raise FileNotFoundError(
        f"data.corpus={spec!r} is not prepared under data.tfds_data_dir={data_dir!r} (no "
        f"{os.path.join(parent, version or '<version>', 'dataset_info.json')}); jaxlm never downloads: prepare it "
        f"where there is network (tfds build {name}{'/' + config if config else ''} --data_dir=... "
        "--file_format=array_record) and point data.tfds_data_dir at it")
  return os.path.join(parent, prepared[-1])


def _is_version(name: str) -> bool:
  parts = name.split(".")
  return len(parts) == 3 and all(p.isdigit() for p in parts)


def records(spec: str, data_dir: str, split: str = "train") -> Iterator[Tuple[int, Dict[str, Any]]]:
  """(index, record) of the split in order; bytes fields decoded as UTF-8 text."""
  import tensorflow_datasets as tfds
  directory = dataset_dir(spec, data_dir)
  builder = tfds.builder_from_directory(directory)
  if split not in builder.info.splits:
    raise ValueError(f"data.corpus={spec!r} has no split {split!r} (has: {sorted(builder.info.splits)})")
  try:
    source = builder.as_data_source(split=split)
  except Exception as e:  # noqa: BLE001: e.g. prepared as TFRecord, which has no random access
    raise ValueError(f"data.corpus={spec!r}: {directory} cannot be read with random access ({e}); prepare it with "
                     "--file_format=array_record") from e
  for i in range(len(source)):
    yield i, {k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in source[i].items()}


def version_of(spec: str, data_dir: str) -> str:
  return os.path.basename(dataset_dir(spec, data_dir))
