"""jaxlm's TFDS builder: tokenized documents -> a TFDS dataset of ArrayRecord shards (one split, 'train').

Each record is a piece of one document (at most `record_tokens` tokens; a document's last piece ends with its
separator), in corpus order, so the records laid end to end are the token stream. Alongside the shards it
writes two int64 arrays (raw files, memory-mapped by the reader): `record_starts` (token offset of each record,
plus the total) and `record_docs` (the document each record belongs to).

TFDS's own writer keeps up to 1 GB of examples in memory and, with shuffling off, re-reads them as one bucket;
this builder writes its shards as the records arrive instead (constant memory) and hands TFDS the split info.
The result is an ordinary TFDS directory: `tfds.builder_from_directory(dir)` loads it, no jaxlm code needed.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.core import splits as splits_lib

from jaxlm.data.store import DATASET_NAME, DATASET_VERSION, RECORD_DOCS, RECORD_STARTS

# (example features, starts a new document)
Record = Tuple[dict, bool]


@dataclasses.dataclass
class BuildPlan:
  records: Callable[[], Iterator[Record]]  # the records, in order
  index_dir: str                           # where RECORD_STARTS / RECORD_DOCS are written
  with_loss: bool = False                  # records carry a per-token 'loss' mask (uint8)
  token_dtype: str = "int32"               # 'uint16' halves the shards when every id is below 65536
  shard_bytes: int = 256 << 20             # a new shard after this many bytes
  description: str = ""
  metadata: Optional[dict] = None


class JaxlmTokens(tfds.core.GeneratorBasedBuilder):
  """Token records of one corpus under one tokenizer (see the module docstring)."""

  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {"1.0.0": "token records with a memory-mapped offset index"}

  name = DATASET_NAME

  def __init__(self, *, plan: BuildPlan, **kwargs):
    self._plan = plan
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {"tokens": tfds.features.Tensor(shape=(None,), dtype=np.dtype(self._plan.token_dtype),
                                               encoding=tfds.features.Encoding.BYTES)}
    if self._plan.with_loss:
      features["loss"] = tfds.features.Tensor(shape=(None,), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES)
    return self.dataset_info_from_configs(
        description=self._plan.description or "jaxlm token records",
        features=tfds.features.FeaturesDict(features),
        disable_shuffling=True,  # the order is the token stream's
        metadata=tfds.core.MetadataDict(self._plan.metadata or {}),
    )

  def _split_generators(self, dl_manager):  # pragma: no cover - _generate_splits is overridden
    raise NotImplementedError

  def _generate_examples(self):  # pragma: no cover
    raise NotImplementedError

  def _generate_splits(self, dl_manager, download_config) -> List[splits_lib.SplitInfo]:
    del dl_manager, download_config
    template = self._get_filename_template(split_name="train")
    serializer = example_serializer.ExampleSerializer(self.info.features.get_serialized_info())
    shards = _ShardWriter(os.fspath(template.data_dir), self._plan.shard_bytes)
    os.makedirs(self._plan.index_dir, exist_ok=True)
    with open(os.path.join(self._plan.index_dir, RECORD_STARTS), "wb") as starts_f, \
         open(os.path.join(self._plan.index_dir, RECORD_DOCS), "wb") as docs_f:
      offset, doc = 0, -1
      for example, starts_doc in self._plan.records():
        doc += bool(starts_doc)
        starts_f.write(np.int64(offset).tobytes())
        docs_f.write(np.int64(doc).tobytes())
        offset += len(example["tokens"])
        example = {**example, "tokens": example["tokens"].astype(self._plan.token_dtype, copy=False)}
        shards.write(serializer.serialize_example(self.info.features.encode_example(example)))
      starts_f.write(np.int64(offset).tobytes())
    if not shards.lengths or not sum(shards.lengths):
      raise ValueError("the corpus has no documents to write")
    paths = shards.close()
    for i, path in enumerate(paths):
      os.replace(path, os.fspath(template.sharded_filepath(shard_index=i, num_shards=len(paths))))
    return [splits_lib.SplitInfo(name="train", shard_lengths=shards.lengths, num_bytes=shards.total_bytes,
                                 filename_template=template)]


class _ShardWriter:
  """ArrayRecord files of about `shard_bytes` each, under temporary names until the count is known."""

  def __init__(self, directory: str, shard_bytes: int):
    self.directory, self.shard_bytes = directory, shard_bytes
    self.paths: List[str] = []
    self.lengths: List[int] = []
    self.total_bytes = 0
    self._writer, self._bytes = None, 0

  def write(self, serialized: bytes) -> None:
    from array_record.python import array_record_module
    if self._writer is None or self._bytes >= self.shard_bytes:
      self._close_current()
      os.makedirs(self.directory, exist_ok=True)
      self.paths.append(os.path.join(self.directory, f"partial-shard-{len(self.paths):05d}"))
      self._writer = array_record_module.ArrayRecordWriter(self.paths[-1], "group_size:1")
      self.lengths.append(0)
      self._bytes = 0
    self._writer.write(serialized)
    self._bytes += len(serialized)
    self.total_bytes += len(serialized)
    self.lengths[-1] += 1

  def _close_current(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def close(self) -> List[str]:
    self._close_current()
    return self.paths
