"""Random access to a prepared dataset's token stream: token ranges, per-token loss masks, document ids.

Records are read through `tfds.data_source` (ArrayRecord); the offset index is memory-mapped, so opening a
dataset of any size takes milliseconds and memory only holds what is read. Decoded records are kept (least
recently used first out, up to RECORD_CACHE_BYTES): a record holds ~2k tokens and a training window ~65-1025, so
neighbouring windows share records, and a small corpus (tiny Shakespeare: 4.5 MB decoded) is decoded once. TFDS
decoding was ~40 us a record: half the CPU the training loop spent on data on yinggem:tiny.
"""
from __future__ import annotations

import functools
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
RECORD_CACHE_BYTES = 64 << 20


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
    self._new_cache()

  def _new_cache(self) -> None:
    bytes_per_record = max(1, self.n_tokens // max(self.n_records, 1)) * (5 if self.with_loss else 4)
    self._record = functools.lru_cache(maxsize=max(1, RECORD_CACHE_BYTES // bytes_per_record))(self._decode)

  def __getstate__(self):  # Grain worker processes get a copy without the cache (it is not picklable)
    return {k: v for k, v in self.__dict__.items() if k != "_record"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._new_cache()

  def _decode(self, r: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Record r's (tokens int32, loss uint8 or None), read-only: they are shared by every later read."""
    part = self.source[r]
    tokens = np.asarray(part["tokens"], np.int32)
    loss = np.asarray(part["loss"]) if self.with_loss else None
    for a in (tokens, loss):
      if a is not None:
        a.flags.writeable = False
    return tokens, loss

  def _records_of(self, start: int, stop: int) -> range:
    first = int(np.searchsorted(self.record_starts, start, side="right")) - 1
    last = int(np.searchsorted(self.record_starts, stop, side="left"))
    return range(max(first, 0), min(last, self.n_records))

  def read(self, start: int, stop: int) -> Tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """(tokens int32, loss uint8 or None, document id int64) of stream positions [start, stop)."""
    if not 0 <= start <= stop <= self.n_tokens:
      raise IndexError(f"token range [{start}, {stop}) outside the stream of {self.n_tokens} tokens")
    records = self._records_of(start, stop)
    parts = [self._record(r) for r in records]
    tokens = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
    loss = np.concatenate([p[1] for p in parts]) if parts and self.with_loss else None
    lengths = [len(p[0]) for p in parts]
    docs = np.repeat(np.asarray(self.record_docs[records.start:records.stop]), lengths)
    skip = start - int(self.record_starts[records.start]) if parts else 0
    cut = slice(skip, skip + stop - start)
    return tokens[cut], (loss[cut] if loss is not None else None), docs[cut]

  def windows(self, starts, length: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(tokens int32 [n, length], loss uint8 [n, length] or None): stream positions [s, s + length) for each start
    s, as `read` gives them. A window inside one record (most: records hold thousands of tokens) is sliced from
    that record straight, without read()'s per-call concatenation; the batch's reading is then a few microseconds
    a row, which matters on CPU, where the data threads share the cores with the train step."""
    starts = np.asarray(starts, np.int64).reshape(-1)
    if len(starts) and (starts.min() < 0 or starts.max() + length > self.n_tokens):
      bad = int(starts[(starts < 0) | (starts + length > self.n_tokens)][0])
      raise IndexError(f"token range [{bad}, {bad + length}) outside the stream of {self.n_tokens} tokens")
    records = np.searchsorted(self.record_starts, starts, side="right") - 1
    begins = np.asarray(self.record_starts[records])
    ends = np.asarray(self.record_starts[records + 1])
    tokens = np.empty((len(starts), length), np.int32)
    loss = np.empty((len(starts), length), np.uint8) if self.with_loss else None
    for i, (start, record, begin, end) in enumerate(zip(starts.tolist(), records.tolist(), begins.tolist(),
                                                        ends.tolist())):
      if start + length <= end:
        record_tokens, record_loss = self._record(record)
        piece = slice(start - begin, start - begin + length)
        tokens[i] = record_tokens[piece]
        if loss is not None:
          loss[i] = record_loss[piece]
      else:  # the window crosses into the next record(s)
        row_tokens, row_loss, _ = self.read(start, start + length)
        tokens[i] = row_tokens
        if loss is not None:
          loss[i] = row_loss
    return tokens, loss

  def doc_range(self, doc: int) -> Tuple[int, int]:
    """Token range [start, stop) of document `doc` (its separator included)."""
    first = int(np.searchsorted(self.record_docs, doc, side="left"))
    last = int(np.searchsorted(self.record_docs, doc, side="right"))
    return int(self.record_starts[first]), int(self.record_starts[last])
