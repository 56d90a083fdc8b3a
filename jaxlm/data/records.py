"""Token pieces -> document records: each document's tokens then its separator, cut into records of at most
`record_tokens` tokens so a reader never decodes much more than it needs. A record never spans two documents.
"""
from __future__ import annotations

from typing import Iterable, Iterator, List, Sequence, Tuple

import numpy as np

from jaxlm.data.tokenize_pool import TokenPiece

DEFAULT_RECORD_TOKENS = 2048


def document_records(pieces: Iterable[TokenPiece], separator: Sequence[int], *, record_tokens: int = DEFAULT_RECORD_TOKENS,
                     with_loss: bool = False) -> Iterator[Tuple[dict, bool]]:
  """(record features, starts a document) in stream order. With `with_loss`, records carry 'loss' (uint8,
  1 where the loss applies; the separator takes its document's last piece's)."""
  if record_tokens < 1:
    raise ValueError(f"record_tokens must be >= 1, got {record_tokens}")
  separator = np.asarray(separator, np.int32)
  tokens: List[np.ndarray] = []
  losses: List[np.ndarray] = []
  held, first = 0, True

  def emit(upto: int):
    nonlocal tokens, losses, held, first
    all_tokens = np.concatenate(tokens)
    all_loss = np.concatenate(losses)
    for begin in range(0, upto, record_tokens):
      end = min(begin + record_tokens, upto)
      record = {"tokens": all_tokens[begin:end]}
      if with_loss:
        record["loss"] = all_loss[begin:end]
      yield record, first
      first = False
    tokens, losses = [all_tokens[upto:]], [all_loss[upto:]]
    held = len(tokens[0])

  for ids, loss, ends in pieces:
    tokens.append(ids)
    losses.append(np.full(len(ids), loss, np.uint8))
    held += len(ids)
    if ends:
      tokens.append(separator)
      losses.append(np.full(len(separator), loss, np.uint8))
      held += len(separator)
      yield from emit(held)
      tokens, losses, held, first = [], [], 0, True
    elif held >= 2 * record_tokens:  # a long document: write its full records, keep the rest
      yield from emit(held - held % record_tokens)
