"""Token stream -> Grain training iterator and fixed validation batches; `build_data` is what the trainer calls.

Training examples are windows of a token array: `inputs = tokens[s:s+L]`, `targets = tokens[s+1:s+L+1]`.
With packing='windows' every start offset is an example (nanoGPT's random windows, made a
deterministic, checkpointable dataset); with packing='documents' the documents are joined with
eos and cut into non-overlapping windows. The iterator is a Grain `DatasetIterator`, so
`get_state()`/`set_state()` and Orbax (`grain.checkpoint.CheckpointSave/CheckpointRestore`) work on it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import grain
import ml_collections
import numpy as np

from jaxlm.data import loader
from jaxlm.data import prepared
from jaxlm.data import sources
from jaxlm.data import store as store_lib
from jaxlm.data import tokenizers

Batch = Dict[str, np.ndarray]


def default_data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "corpus": "tinyshakespeare",  # shipped name, path, or 'a+b'
      "text_field": "text",         # JSONL field holding the text
      "format": "text",             # how records become documents: text | dolly | dialogue
      "tokenizer": "char",          # char | sentencepiece | gpt2 | ids
      "tokenizer_path": "",         # sentencepiece .model or 'train:bpe'|'train:unigram'; gpt2 assets dir; '' = shipped
      "vocab_size": 0,              # model vocabulary; 0 = the tokenizer's
      "val_fraction": 0.1,          # last fraction of the token stream is validation
      "packing": "windows",         # windows (every offset) | documents (segments, stride seq_len) | padded (one doc a row)
      "eval_batches": 0,            # cap on validation batches; 0 = all
      "cache_dir": "",              # prepared datasets; '' = ~/.cache/jaxlm/prepared (XDG_CACHE_HOME)
      "tfds_data_dir": "",          # where tfds:NAME corpora are prepared; '' = ~/tensorflow_datasets
      "min_chars": 0,               # documents shorter than this are dropped (HRM-Text1's C4: 101)
      "language": "",               # keep only documents langdetect finds in this language ('en'); '' = all
      "loss_on": "all",             # all | response (assistant turns / Dolly responses only)
      "fraction": 1.0,              # share of the train split used (its first part)
      "mixture": "",                # 'CORPUS=WEIGHT,CORPUS=WEIGHT': examples drawn from each in proportion; '' = corpus
      "replay": 0.0,                # share of training examples from data.replay_corpus (earlier data, against forgetting)
      "replay_corpus": "",          # 'a,b': corpora replayed; '' = those of the train.init_from parent's history
  })


@dataclasses.dataclass
class DataBundle:
  tokenizer: tokenizers.Tokenizer
  train_iter: grain.DatasetIterator  # infinite; batches of int32 inputs/targets and float32 weights [B, L]
  eval_batches: Callable[[], List[Batch]]  # a fresh list of validation batches on each call
  train_tokens: int
  val_tokens: int
  vocab_size: int  # the model's vocabulary: data.vocab_size, or the tokenizer's when that is 0


# ---------------------------------------------------------------- token stream

def split_tokens(tokens: np.ndarray, val_fraction: float) -> Tuple[np.ndarray, np.ndarray]:
  """First 1 - val_fraction of the stream is train, the rest validation."""
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
  n_train = int(len(tokens) * (1.0 - val_fraction))
  return tokens[:n_train], tokens[n_train:]


def pack_documents(docs: List[str], tokenizer: tokenizers.Tokenizer) -> np.ndarray:
  """Each document's tokens followed by eos (or the encoded blank-line separator if there is no eos)."""
  sep = [tokenizer.eos_id] if tokenizer.eos_id is not None else tokenizer.encode(sources.DOC_SEPARATOR)
  ids: List[int] = []
  for doc in docs:
    ids.extend(tokenizer.encode(doc))
    ids.extend(sep)
  return np.asarray(ids, dtype=np.int32)


def window_starts(n_tokens: int, seq_len: int, stride: int) -> range:
  """Start offsets s with s + seq_len + 1 <= n_tokens (targets need one token past the inputs)."""
  return range(0, max(0, n_tokens - seq_len), stride)


class LocalWindows:
  """A global batch of window start offsets -> this process's rows of it, as one example batch.

  A class, not a closure, so Grain workers can pickle it. `rows` (sorted global row indices) selects what this
  process's devices hold; only those windows are read.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, rows: Sequence[int] | None = None):
    self.tokens = tokens
    self.seq_len = seq_len
    self.rows = None if rows is None else np.asarray(rows, np.int64)

  def __call__(self, starts: np.ndarray) -> Batch:
    starts = np.asarray(starts, np.int64)
    if self.rows is not None:
      starts = starts[self.rows]
    window = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)[None, :]]
    return {"inputs": window[:, :-1], "targets": window[:, 1:],
            "weights": np.ones((len(starts), self.seq_len), np.float32)}


# ---------------------------------------------------------------- training

def train_dataset(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int, stride: int = 1,
                  rows: Sequence[int] | None = None, start_batch: int = 0) -> grain.MapDataset:
  """Infinite, shuffled (reshuffled each epoch) batches of windows, from global batch `start_batch` on.

  Global batch b holds examples b*batch_size ... (b+1)*batch_size - 1 of the shuffled, repeated stream of start
  offsets, whatever the number of processes; a process reads only `rows` of each (all rows when None). Only the
  offsets of the other rows are touched, never their tokens.
  """
  starts = window_starts(len(tokens), seq_len, stride)
  return (grain.MapDataset.range(starts.start, starts.stop, starts.step)
          .shuffle(seed=int(seed))
          .repeat()
          .batch(batch_size, drop_remainder=True)
          .map(LocalWindows(np.asarray(tokens, np.int32), seq_len, rows))
          [int(start_batch):])


def train_iterator(dataset: grain.MapDataset, *, num_threads: int = 2, prefetch: int = 8) -> grain.DatasetIterator:
  """An iterator that reads ahead in threads; the prefetch buffer is kept small since elements are whole
  batches. The trainer records its position as a count of global batches (see `train_dataset`)."""
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(dataset.to_iter_dataset(options))


# ---------------------------------------------------------------- validation

def eval_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, max_batches: int = 0,
                 rows: Sequence[int] | None = None) -> List[Batch]:
  """Non-overlapping windows in order. The last batch is filled with zero rows of weight 0 so every
  batch has the same shape. With `rows`, each batch keeps only those rows of the global batch."""
  starts = np.asarray(window_starts(len(tokens), seq_len, seq_len), dtype=np.int64)
  if max_batches:
    starts = starts[:max_batches * batch_size]
  tokens = np.asarray(tokens, np.int32)
  batches = []
  for first in range(0, len(starts), batch_size):
    chunk = starts[first:first + batch_size]
    index = chunk[:, None] + np.arange(seq_len + 1)[None, :]
    windows = np.zeros((batch_size, seq_len + 1), np.int32)
    windows[:len(chunk)] = tokens[index]
    weights = np.zeros((batch_size, seq_len), np.float32)
    weights[:len(chunk)] = 1.0
    if rows is not None:
      windows, weights = windows[rows], weights[rows]
    batches.append({"inputs": windows[:, :-1], "targets": windows[:, 1:], "weights": weights})
  return batches


# ---------------------------------------------------------------- entry point

_STRIDES = {"windows": lambda seq_len: 1, "documents": lambda seq_len: seq_len}


def _config_values(data_cfg) -> Dict[str, Any]:
  values = default_data_config().to_dict()
  given = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg or {})
  unknown = sorted(set(given) - set(values))
  if unknown:
    raise ValueError(f"unknown data config field(s) {unknown}; known fields: {sorted(values)}")
  values.update(given)
  if values["packing"] not in loader.PACKINGS:
    raise ValueError(f"unknown data.packing {values['packing']!r}; known: {list(loader.PACKINGS)}")
  return values


def _tokenizer(cfg: Mapping[str, Any], text_fn: Callable[[], str], tokenizer_dir) -> tokenizers.Tokenizer:
  """The tokenizer saved in `tokenizer_dir` if there is one (a resumed run keeps its vocabulary), else a new one."""
  if tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, tokenizers.TOKENIZER_FILE)):
    return _check_kind(tokenizers.load_tokenizer(tokenizer_dir), cfg, os.path.join(tokenizer_dir, tokenizers.TOKENIZER_FILE))
  tok = tokenizers.make_tokenizer(cfg, text_fn, work_dir=tokenizer_dir)
  if tokenizer_dir:
    tok.save(tokenizer_dir)
  return tok


def _check_kind(tok: tokenizers.Tokenizer, cfg: Mapping[str, Any], where: str) -> tokenizers.Tokenizer:
  if tok.kind != cfg["tokenizer"]:
    raise ValueError(f"{where} holds a {tok.kind!r} tokenizer but data.tokenizer is {cfg['tokenizer']!r}")
  return tok


def resolve_tokenizer(data_cfg, tokenizer_dir: str) -> tokenizers.Tokenizer:
  """The tokenizer saved in local `tokenizer_dir`, else a new one (trained on the corpus when its kind trains),
  saved there. What the primary process of a run does before the others load the saved one."""
  cfg = _config_values(data_cfg)
  return _tokenizer(cfg, lambda: sources.load_text(str(cfg["corpus"]), cfg["text_field"], cfg["format"]),
                    tokenizer_dir)


def _too_short(split: str, corpus: str, n: int, seq_len: int, val_fraction: float) -> ValueError:
  return ValueError(f"the {split} split of corpus {corpus!r} has {n} tokens (val_fraction={val_fraction}), "
                    f"fewer than one window of seq_len + 1 = {seq_len + 1} tokens; lower seq_len or use a larger corpus"
                    + (" / val_fraction" if split == "validation" else ""))


def build_data(data_cfg, *, seq_len: int, batch_size: int, seed: int, tokenizer_dir: str | None = None,
               eval_batch_size: int = 0, tokenizer: Optional[tokenizers.Tokenizer] = None,
               rows: Optional[Sequence[int]] = None, eval_rows: Optional[Sequence[int]] = None,
               start_batch: int = 0) -> DataBundle:
  """Reads the corpus, tokenizes it, splits train/validation and builds the train iterator and eval batches.

  A `char` vocabulary is built from the whole corpus (as nanoGPT does), so validation text has no
  unknown characters. `tokenizer` is used as given; else, with `tokenizer_dir`, a tokenizer.json already there
  is reused, or the new tokenizer is saved there. Validation batches hold `eval_batch_size` windows
  (0: batch_size). In a multi-process run `rows` / `eval_rows` are the rows of each global train / validation
  batch this process feeds (None: all); training starts at global batch `start_batch` (a resumed run).
  """
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len and batch_size must be >= 1, got seq_len={seq_len}, batch_size={batch_size}")
  cfg = _config_values(data_cfg)
  if cfg["packing"] not in _STRIDES:
    raise ValueError(f"data.packing={cfg['packing']!r} reads prepared data: use build_prepared_data")
  corpus = str(cfg["corpus"])
  docs = sources.load_documents(corpus, cfg["text_field"], cfg["format"])
  text = sources.DOC_SEPARATOR.join(docs)
  if tokenizer is not None:
    tok = _check_kind(tokenizer, cfg, "the given tokenizer")
  else:
    tok = _tokenizer(cfg, lambda: text, tokenizer_dir)

  vocab_size = int(cfg["vocab_size"]) or tok.vocab_size
  if vocab_size < tok.vocab_size:
    raise ValueError(f"data.vocab_size={vocab_size} is smaller than the {tok.kind} tokenizer's vocabulary ({tok.vocab_size})")

  if cfg["packing"] == "documents":
    tokens = pack_documents(docs, tok)
  else:
    tokens = np.asarray(tok.encode(text), dtype=np.int32)
  train, val = split_tokens(tokens, float(cfg["val_fraction"]))
  if len(train) < seq_len + 1:
    raise _too_short("train", corpus, len(train), seq_len, cfg["val_fraction"])
  if cfg["val_fraction"] > 0 and len(val) < seq_len + 1:
    raise _too_short("validation", corpus, len(val), seq_len, cfg["val_fraction"])

  stride = _STRIDES[cfg["packing"]](seq_len)
  dataset = train_dataset(train, seq_len=seq_len, batch_size=batch_size, seed=seed, stride=stride, rows=rows,
                          start_batch=start_batch)
  max_eval = int(cfg["eval_batches"])
  eval_batch_size = eval_batch_size or batch_size
  return DataBundle(
      tokenizer=tok,
      train_iter=train_iterator(dataset),
      eval_batches=lambda: eval_batches(val, seq_len=seq_len, batch_size=eval_batch_size, max_batches=max_eval,
                                        rows=eval_rows),
      train_tokens=len(train),
      val_tokens=len(val),
      vocab_size=vocab_size,
  )


# ---------------------------------------------------------------- prepared data (what training reads)

def run_tokenizer(root: str, tokenizer_dir: str) -> tokenizers.Tokenizer:
  """The run's tokenizer: the one saved in local `tokenizer_dir` (a resumed run), which must be the one the
  prepared dataset `root` was made with; else the dataset's, saved there."""
  made_with = prepared.load_tokenizer(root)
  if not os.path.isfile(os.path.join(tokenizer_dir, tokenizers.TOKENIZER_FILE)):
    made_with.save(tokenizer_dir)
    return made_with
  saved = tokenizers.load_tokenizer(tokenizer_dir)
  if (saved.kind, saved.vocab_size) != (made_with.kind, made_with.vocab_size) or _fingerprint(saved) != _fingerprint(made_with):
    raise ValueError(f"the run's tokenizer ({tokenizer_dir}: {saved!r}) is not the one the prepared dataset {root} "
                     f"was made with ({made_with!r}); delete that dataset so training prepares it again with the "
                     "run's tokenizer, or use a new workdir")
  return saved


def _fingerprint(tok: tokenizers.Tokenizer):
  probe = "The quick brown fox, 123 <s><user> über \n\n"
  try:
    return tok.encode(probe)
  except Exception:  # noqa: BLE001: e.g. the ids tokenizer reads only numbers
    return None


def build_prepared_data(roots, data_cfg, *, seq_len: int, batch_size: int, seed: int,
                        tokenizer: tokenizers.Tokenizer, eval_batch_size: int = 0,
                        rows: Optional[Sequence[int]] = None, eval_rows: Optional[Sequence[int]] = None,
                        start_batch: int = 0) -> DataBundle:
  """Training batches and validation batches of the prepared dataset(s) `roots` (one directory, or one per
  component of data.mixture, see jaxlm.data.loader); nothing is tokenized and nothing is read until a batch is
  asked for. Validation goes through every component's validation split in turn."""
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len and batch_size must be >= 1, got seq_len={seq_len}, batch_size={batch_size}")
  roots = [roots] if isinstance(roots, str) else list(roots)
  cfg = _config_values(data_cfg)
  vocab_size = int(cfg["vocab_size"]) or tokenizer.vocab_size
  if vocab_size < tokenizer.vocab_size:
    raise ValueError(f"data.vocab_size={vocab_size} is smaller than the {tokenizer.kind} tokenizer's vocabulary ({tokenizer.vocab_size})")
  parts = prepared.components(cfg)
  if len(parts) != len(roots):
    raise ValueError(f"{len(roots)} prepared dataset(s) for the {len(parts)} corpora data.corpus/data.mixture name")
  splits = []
  for root, (part, _) in zip(roots, parts):
    split = loader.Split(store_lib.TokenStore(root), cfg["packing"], seq_len, float(cfg["val_fraction"]),
                         float(cfg["fraction"]))
    if not len(split.train_ids()):
      raise _too_short("train", part["corpus"], split.train_tokens, seq_len, cfg["val_fraction"])
    if cfg["val_fraction"] > 0 and not len(split.val_ids()) and not part.get("replay_component"):
      raise _too_short("validation", part["corpus"], split.val_tokens, seq_len, cfg["val_fraction"])
    splits.append(split)
  pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  if len(roots) == 1:
    dataset = loader.train_dataset(roots[0], splits[0], batch_size=batch_size, seed=seed, rows=rows,
                                   start_batch=start_batch, pad_id=pad_id)
  else:
    dataset = loader.mixture_dataset(roots, splits, [w for _, w in parts], batch_size=batch_size, seed=seed,
                                     rows=rows, start_batch=start_batch, pad_id=pad_id)
  eval_batch_size = eval_batch_size or batch_size
  # Validation reads the corpora the run is for: replayed ones are trained on only.
  evals = [loader.EvalBatches(root, split, batch_size=eval_batch_size, max_batches=int(cfg["eval_batches"]),
                              rows=eval_rows, pad_id=pad_id)
           for root, split, (part, _) in zip(roots, splits, parts) if not part.get("replay_component")]
  return DataBundle(tokenizer=tokenizer, train_iter=train_iterator(dataset),
                    eval_batches=lambda: evals[0] if len(evals) == 1 else _Chained(evals),
                    train_tokens=sum(s.train_tokens for s in splits), val_tokens=sum(s.val_tokens for s in splits),
                    vocab_size=vocab_size)


class _Chained:
  """Several re-iterable batch sequences as one."""

  def __init__(self, parts):
    self.parts = parts

  def __len__(self) -> int:
    return sum(len(p) for p in self.parts)

  def __iter__(self):
    for part in self.parts:
      yield from part

  @property
  def windows(self) -> int:
    return sum(p.windows for p in self.parts)

  def subset(self, windows: int, seed: int) -> "_Chained":
    """`windows` drawn from the parts in proportion to their sizes (see loader.EvalBatches.subset)."""
    total = max(self.windows, 1)
    return _Chained([p.subset(max(1, round(windows * p.windows / total)), seed + i) for i, p in enumerate(self.parts)])
