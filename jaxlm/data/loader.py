"""A prepared dataset -> Grain training batches and validation batches, read with random access.

The token stream's first 1 - data.val_fraction is train (of which data.fraction is used), the rest validation.
Packing (`data.packing`):
  windows    every start offset of the train stream is an example (as the in-memory pipeline does);
  documents  non-overlapping windows with `segment_ids` (1, 2, ... per document within a row); a target in
             another document than its input gets weight 0, so the loss never crosses a document boundary;
  padded     one document per row, cut to seq_len + 1 tokens and padded (`padding_mask` marks real inputs);
             HROM's batching. Train and validation are the first / last documents.
Prepared with data.loss_on='response', only the marked tokens (assistant turns, Dolly responses) carry weight.
Global batch b holds examples b*B ... (b+1)*B - 1 of the shuffled, repeated example stream whatever the number
of processes; each process reads only its `rows`, so a resumed run continues from `start_batch` exactly.
"""
from __future__ import annotations

import copy
from typing import Dict, Iterator, Optional, Sequence

import grain
import numpy as np

from jaxlm.data import store as store_lib

Batch = Dict[str, np.ndarray]
PACKINGS = ("windows", "documents", "padded")


class _Rows:
  """Builds one batch from a global batch of example ids (window starts or document ids), reading only this
  process's rows. A class so Grain can hold it; the store opens on first use."""

  def __init__(self, root: str, seq_len: int, packing: str, rows: Optional[Sequence[int]], pad_id: int):
    self.root, self.seq_len, self.packing, self.pad_id = root, seq_len, packing, pad_id
    self.rows = None if rows is None else np.asarray(rows, np.int64)
    self._store = None

  @property
  def store(self) -> store_lib.TokenStore:
    if self._store is None:
      self._store = store_lib.TokenStore(self.root)
    return self._store

  def __call__(self, ids) -> Batch:
    ids = np.asarray(ids, np.int64)
    if self.rows is not None:
      ids = ids[self.rows]
    if self.packing == "windows":  # the batch's windows in one read (what example() gives row by row)
      tokens, loss = self.store.windows(ids, self.seq_len + 1)
      weights = np.ones((len(ids), self.seq_len), np.float32) if loss is None else loss[:, 1:].astype(np.float32)
      return {"inputs": np.ascontiguousarray(tokens[:, :-1]), "targets": np.ascontiguousarray(tokens[:, 1:]),
              "weights": weights}
    return _stack([self.example(int(i)) for i in ids])

  def example(self, i: int) -> Batch:
    return self._padded(i) if self.packing == "padded" else self._window(i)

  def _window(self, start: int) -> Batch:
    tokens, loss, docs = self.store.read(start, start + self.seq_len + 1)
    weights = np.ones(self.seq_len, np.float32) if loss is None else loss[1:].astype(np.float32)
    out = {"inputs": tokens[:-1], "targets": tokens[1:], "weights": weights}
    if self.packing == "documents":
      segments = (docs - docs[0] + 1).astype(np.int32)
      out["weights"] = weights * (segments[:-1] == segments[1:])
      out["segment_ids"] = segments[:-1]
    return out

  def _padded(self, doc: int) -> Batch:
    begin, end = self.store.doc_range(doc)
    tokens, loss, _ = self.store.read(begin, min(end, begin + self.seq_len + 1))
    n = len(tokens)
    row = np.full(self.seq_len + 1, self.pad_id, np.int32)
    row[:n] = tokens
    weights = np.zeros(self.seq_len, np.float32)
    weights[:n - 1] = 1.0 if loss is None else loss[1:n]
    return {"inputs": row[:-1], "targets": row[1:], "weights": weights,
            "padding_mask": np.arange(self.seq_len) < min(n, self.seq_len)}


def _stack(examples) -> Batch:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class _Tag:
  """id -> (component, id): which dataset of a mixture an example comes from."""

  def __init__(self, component: int):
    self.component = component

  def __call__(self, i):
    return self.component, i


class _MixedRows:
  """A global batch of (component, id) pairs -> this process's rows, each read from its component."""

  def __init__(self, readers, rows):
    self.readers = readers
    self.rows = None if rows is None else np.asarray(rows, np.int64)

  def __call__(self, tagged) -> Batch:
    components, ids = (np.asarray(x, np.int64) for x in tagged)
    if self.rows is not None:
      components, ids = components[self.rows], ids[self.rows]
    return _stack([self.readers[c].example(int(i)) for c, i in zip(components, ids)])


class Split:
  """The example ids of the train or validation part of a prepared dataset under one packing."""

  def __init__(self, store: store_lib.TokenStore, packing: str, seq_len: int, val_fraction: float,
               fraction: float = 1.0):
    if packing not in PACKINGS:
      raise ValueError(f"unknown data.packing {packing!r}; known: {list(PACKINGS)}")
    if not 0.0 <= val_fraction < 1.0:
      raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 < fraction <= 1.0:
      raise ValueError(f"data.fraction must be in (0, 1], got {fraction}")
    self.packing, self.seq_len = packing, seq_len
    unit = store.n_docs if packing == "padded" else store.n_tokens
    n_train = int(unit * (1.0 - val_fraction))
    self.train_end, self.val_end, self.used_end = n_train, unit, int(n_train * fraction)
    if packing == "padded":
      self.train_tokens = store.doc_range(n_train - 1)[1] if n_train else 0
      self.val_tokens = store.n_tokens - self.train_tokens
    else:
      self.train_tokens, self.val_tokens = n_train, store.n_tokens - n_train

  def train_ids(self) -> range:
    if self.packing == "padded":
      return range(0, self.used_end)
    stride = 1 if self.packing == "windows" else self.seq_len
    return range(0, max(0, self.used_end - self.seq_len), stride)

  def val_ids(self) -> range:
    if self.packing == "padded":
      return range(self.train_end, self.val_end)
    return range(self.train_end, max(self.train_end, self.val_end - self.seq_len), self.seq_len)


def train_dataset(root: str, split: Split, *, batch_size: int, seed: int, rows=None, start_batch: int = 0,
                  pad_id: int = 0) -> grain.MapDataset:
  ids = split.train_ids()
  return (grain.MapDataset.range(ids.start, ids.stop, ids.step)
          .shuffle(seed=int(seed))
          .repeat()
          .batch(batch_size, drop_remainder=True)
          .map(_Rows(root, split.seq_len, split.packing, rows, pad_id))
          [int(start_batch):])


def mixture_dataset(roots: Sequence[str], splits: Sequence["Split"], weights: Sequence[float], *, batch_size: int,
                    seed: int, rows=None, start_batch: int = 0, pad_id: int = 0) -> grain.MapDataset:
  """Batches whose examples come from the components in proportion to `weights` (Grain's deterministic
  mixing, so a resumed run continues exactly); each component is shuffled and repeated on its own."""
  parts = []
  for c, split in enumerate(splits):
    ids = split.train_ids()
    parts.append(grain.MapDataset.range(ids.start, ids.stop, ids.step).shuffle(seed=int(seed) + c).repeat()
                 .map(_Tag(c)))
  readers = [_Rows(root, split.seq_len, split.packing, None, pad_id) for root, split in zip(roots, splits)]
  return (grain.MapDataset.mix(parts, [float(w) for w in weights])
          .batch(batch_size, drop_remainder=True)
          .map(_MixedRows(readers, rows))
          [int(start_batch):])


class EvalBatches:
  """Validation batches in order, read each time they are iterated (a big validation split is never held).
  The last batch is filled with rows of weight 0 so every batch has the same shape."""

  def __init__(self, root: str, split: Split, *, batch_size: int, max_batches: int = 0, rows=None, pad_id: int = 0):
    ids = np.asarray(split.val_ids(), np.int64)
    self.ids = ids[:max_batches * batch_size] if max_batches else ids
    self.batch_size = batch_size
    self.read = _Rows(root, split.seq_len, split.packing, None, pad_id)
    self.rows = None if rows is None else np.asarray(rows, np.int64)

  def __len__(self) -> int:
    return -(-len(self.ids) // self.batch_size)

  @property
  def windows(self) -> int:
    return len(self.ids)

  def subset(self, windows: int, seed: int) -> "EvalBatches":
    """The same batches over `windows` of these windows drawn at random (in order; the same for a seed on
    every process), rounded up to whole batches; all of them when there are fewer."""
    windows = min(len(self.ids), -(-windows // self.batch_size) * self.batch_size)
    part = copy.copy(self)
    picked = np.random.default_rng(seed).choice(len(self.ids), size=windows, replace=False)
    part.ids = self.ids[np.sort(picked)]
    return part

  def __iter__(self) -> Iterator[Batch]:
    for first in range(0, len(self.ids), self.batch_size):
      chunk = self.ids[first:first + self.batch_size]
      batch = self.read(chunk)
      filled = {}
      for key, value in batch.items():
        full = np.zeros((self.batch_size,) + value.shape[1:], value.dtype)
        full[:len(chunk)] = value
        filled[key] = full if self.rows is None else full[self.rows]
      yield filled
