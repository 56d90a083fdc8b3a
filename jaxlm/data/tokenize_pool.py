"""Documents -> token arrays, in order, in worker processes when the corpus is big enough to pay for them.

At most a few batches of text are in flight at a time, so memory does not grow with the corpus. Workers are
spawned (never forked: the caller may be a training process with JAX's threads running) and load the tokenizer
from the directory it was saved in.
"""
from __future__ import annotations

import collections
import multiprocessing
from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np

from jaxlm.data import sources
from jaxlm.data import tokenizers

# One unit of work: ~this many characters of text (a few hundred short documents, or one chunk of a long one).
BATCH_CHARS = 1 << 18

# (token ids, loss on these tokens, last piece of its document)
TokenPiece = Tuple[np.ndarray, bool, bool]

_WORKER_TOKENIZER: Optional[tokenizers.Tokenizer] = None


def _init_worker(tokenizer_dir: str) -> None:
  global _WORKER_TOKENIZER
  _WORKER_TOKENIZER = tokenizers.load_tokenizer(tokenizer_dir)


def _encode_all(texts: List[str], tokenizer: Optional[tokenizers.Tokenizer] = None) -> List[np.ndarray]:
  tokenizer = tokenizer or _WORKER_TOKENIZER
  return [tokenizer.encode_array(text) for text in texts]


def _pieces(docs: Iterable[sources.Document]) -> Iterator[Tuple[str, bool, bool]]:
  """(text, loss, ends_document) for every part of every document; a part is held back one step to know
  whether it is its document's last."""
  for doc in docs:
    held = None
    for text, loss in sources.document_parts(doc):
      if held is not None:
        yield held[0], held[1], False
      held = (text, loss)
    if held is not None:
      yield held[0], held[1], True


def _batches(docs: Iterable[sources.Document]) -> Iterator[List[Tuple[str, bool, bool]]]:
  batch, chars = [], 0
  for piece in _pieces(docs):
    batch.append(piece)
    chars += len(piece[0])
    if chars >= BATCH_CHARS:
      yield batch
      batch, chars = [], 0
  if batch:
    yield batch


def tokenize(docs: Iterable[sources.Document], tokenizer: tokenizers.Tokenizer, tokenizer_dir: str,
             workers: int = 0) -> Iterator[TokenPiece]:
  """Token pieces of `docs` in order; `workers` > 0 encodes in that many spawned processes."""
  if workers <= 0:
    for batch in _batches(docs):
      for (_, loss, ends), ids in zip(batch, _encode_all([text for text, _, _ in batch], tokenizer)):
        yield ids, loss, ends
    return
  context = multiprocessing.get_context("spawn")
  with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_dir,)) as pool:
    in_flight = collections.deque()

    def drain_one():
      flags, result = in_flight.popleft()
      for (loss, ends), ids in zip(flags, result.get()):
        yield ids, loss, ends

    for batch in _batches(docs):
      flags = [(loss, ends) for _, loss, ends in batch]
      in_flight.append((flags, pool.apply_async(_encode_all, ([text for text, _, _ in batch],))))
      if len(in_flight) > 2 * workers:  # bounded: reading never runs far ahead of the workers
        yield from drain_one()
    while in_flight:
      yield from drain_one()
