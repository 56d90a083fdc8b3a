"""Random access to a prepared dataset's token stream: token ranges, per-token loss masks, document ids.

Records are read through `tfds.data_source` (ArrayRecord); the offset index is memory-mapped, so opening a
dataset of any size takes milliseconds and memory only holds what is read.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Tuple

import numpy as np

META_FILE = "jaxlm.json"
# The TFDS dataset jaxlm.data.tfds_builder writes, and its index files (raw int64).
DATASET_NAME, DATASET_VERSION = "jaxlm_tokens", "1.0.0"
RECORD_STARTS = "record_starts.i64"
RECORD_DOCS = "record_docs.i64"
TFDS_SUBDIR = "tfds"
INDEX_SUBDIR = "index"
TOKENIZER_SUBDIR = "tokenizer"


def tfds_dir(root: str) -> str:
  """The TFDS dataset directory (what `tfds.builder_from_directory` takes) inside a prepared dataset."""
  return os.path.join(root, TFDS_SUBDIR, DATASET_NAME, DATASET_VERSION)


class TokenStore:
  """The token stream of a prepared dataset (see jaxlm.data.prepared); all offsets are token offsets."""

  def __init__(self, root: str):
    import tensorflow_datasets as tfds
    self.root = root
    with open(os.path.join(root, META_FILE), encoding="utf-8") as f:
      self.meta = json.load(f)
    builder = tfds.builder_from_directory(tfds_dir(root))
    self.source = builder.as_data_source(split="train")
    self.with_loss = "loss" in builder.info.features
    index = os.path.join(root, INDEX_SUBDIR)
    self.record_starts = np.memmap(os.path.join(index, RECORD_STARTS), np.int64, mode="r")
    self.record_docs = np.memmap(os.path.join(index, RECORD_DOCS), np.int64, mode="r")
    self.n_records = len(self.record_docs)
    if len(self.source) != self.n_records or len(self.record_starts) != self.n_records + 1:
      raise ValueError(f"prepared dataset {root}: {len(self.source)} records but an index of {self.n_records}; "
                       "delete the directory and prepare again")
    self.n_tokens = int(self.record_starts[-1])
    self.n_docs = int(self.record_docs[-1]) + 1 if self.n_records else 0

  def _records_of(self, start: int, stop: int) -> range:
    first = int(np.searchsorted(self.record_starts, start, side="right")) - 1
    last = int(np.searchsorted(self.record_starts, stop, side="left"))
    return range(max(first, 0), min(last, self.n_records))

  def read(self, start: int, stop: int) -> Tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """(tokens int32, loss uint8 or None, document id int64) of stream positions [start, stop)."""
    if not 0 <= start <= stop <= self.n_tokens:
      raise IndexError(f"token range [{start}, {stop}) outside the stream of {self.n_tokens} tokens")
    records = self._records_of(start, stop)
    parts = [self.source[r] for r in records]
    tokens = (np.concatenate([p["tokens"] for p in parts]) if parts else np.zeros(0)).astype(np.int32)
    loss = np.concatenate([p["loss"] for p in parts]) if parts and self.with_loss else None
    lengths = [len(p["tokens"]) for p in parts]
    docs = np.repeat(np.asarray(self.record_docs[records.start:records.stop]), lengths)
    skip = start - int(self.record_starts[records.start]) if parts else 0
    cut = slice(skip, skip + stop - start)
    return tokens[cut], (loss[cut] if loss is not None else None), docs[cut]

  def doc_range(self, doc: int) -> Tuple[int, int]:
    """Token range [start, stop) of document `doc` (its separator included)."""
    first = int(np.searchsorted(self.record_docs, doc, side="left"))
    last = int(np.searchsorted(self.record_docs, doc, side="right"))
    return int(self.record_starts[first]), int(self.record_starts[last])
