"""Blocklist safety filter for chat, modelled on HROM's SafetyManager but applied on word boundaries.

HROM re-encodes the text and looks for each bad word's token ids (which end in `</s>`), so it only fires when
the bad word is the last word of the text, never checks the user's input, and silently truncates. Here an
entry matches as whole words, case-insensitively, anywhere in the text ("kill" blocks "Kill!" but not
"skill" or "killer"; a phrase matches with any whitespace between its words), it is applied to the user's
input and to the model's output as it streams, and a hit is reported.

While a reply streams, `StreamGuard` checks only settled text (the word being generated may still grow:
"harm" can become "harmony") and releases for display only text that no later token can turn into part of
a match, so a blocked word is never shown.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional, Sequence, Tuple

DEFAULT_BLOCKLIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "assets", "blocklist.txt")
_WORD = re.compile(r"\w+")


def read_blocklist(path: str) -> List[str]:
  """Entries of a blocklist file: one per line, '#' comments and blank lines skipped."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise FileNotFoundError(f"cannot read the blocklist {path}: {e.strerror or e}") from None
  entries = []
  for line in lines:
    entry = " ".join(line.split("#", 1)[0].split())
    if entry:
      entries.append(entry.lower())
  return entries


class Blocklist:
  """Whole-word, case-insensitive matching of words and phrases."""

  def __init__(self, entries: Sequence[str], source: str = ""):
    self.entries = sorted({" ".join(e.split()).lower() for e in entries if e.strip()}, key=len, reverse=True)
    self.source = source
    self.max_words = max((len(e.split()) for e in self.entries), default=0)
    if self.entries:
      alternatives = "|".join(r"\s+".join(re.escape(w) for w in e.split()) for e in self.entries)
      # \w boundaries on both sides: a match may not continue a word before or after it.
      self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
    else:
      self._pattern = None

  @classmethod
  def load(cls, path: Optional[str] = None) -> "Blocklist":
    path = path or DEFAULT_BLOCKLIST
    return cls(read_blocklist(path), source=path)

  def __len__(self) -> int:
    return len(self.entries)

  def search(self, text: str) -> Optional[re.Match]:
    return self._pattern.search(text) if self._pattern is not None else None

  def find(self, text: str) -> Optional[str]:
    """The first blocked word or phrase in `text` (as written there), or None."""
    match = self.search(text)
    return match.group(0) if match else None


class StreamGuard:
  """Follows one reply as it grows; tells what may be shown and whether a blocked entry appeared."""

  def __init__(self, blocklist: Blocklist):
    self.blocklist = blocklist
    self.released = 0       # characters of the reply already handed out for display
    self.hit: Optional[str] = None

  def feed(self, text: str, final: bool = False) -> Tuple[str, Optional[str]]:
    """(newly displayable text, blocked entry or None) for the reply so far; `final` when it is complete."""
    if self.hit is not None:
      return "", self.hit
    settled = text if final else _without_open_word(text)
    match = self.blocklist.search(settled)
    if match:
      self.hit = match.group(0)
      safe_end = max(self.released, match.start())
      new, self.released = text[self.released:safe_end], safe_end
      return new, self.hit
    end = len(text) if final else self._release_point(settled)
    if end <= self.released:
      return "", None
    new, self.released = text[self.released:end], end
    return new, None

  def _release_point(self, settled: str) -> int:
    """Keep back the last (max_words - 1) settled words: a phrase could still complete through them."""
    hold = self.blocklist.max_words - 1
    if hold <= 0:
      return len(settled)
    starts = [m.start() for m in _WORD.finditer(settled)]
    return starts[-hold] if len(starts) >= hold else 0


def _without_open_word(text: str) -> str:
  """`text` minus a trailing run of word characters (the next token may extend that word)."""
  match = re.search(r"\w+$", text)
  return text[:match.start()] if match else text
