"""Text corpora: a shipped corpus name or a file path -> documents (strings).

`.txt` files are one document (Project Gutenberg header/footer stripped, BOM and CRLF normalised),
except DailyDialog files (every line ends in `__eou__`), which are one dialogue per line with one
utterance per output line. `.jsonl` files are one document per record, read from `text_field`.
"""
from __future__ import annotations

import json
import os
import re
from typing import List

CORPORA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpora")
SHIPPED = {
    "tinyshakespeare": "tinyshakespeare.txt",
    "alice": "alice.txt",
    "looking_glass": "looking_glass.txt",
    "c4_sample": "c4_sample.jsonl",
    "dailydialog_sample": os.path.join("dailydialog_sample", "dialogues_text.txt"),
}
# How the parts of a multi-document corpus are joined when read as one text.
DOC_SEPARATOR = "\n\n"

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", re.MULTILINE | re.IGNORECASE)
# The "End of [the] Project Gutenberg['s] ..." note just before the END line belongs to the footer too.
_GUTENBERG_END_NOTE = re.compile(r"^End of (the )?Project Gutenberg", re.MULTILINE | re.IGNORECASE)
_EOU = "__eou__"


def resolve(spec: str) -> List[str]:
  """File paths for a corpus spec: a path, a shipped name, or parts joined by '+' ('alice+looking_glass')."""
  spec = os.fspath(spec)
  if os.path.exists(spec) or "+" not in spec:
    return [_resolve_one(spec)]
  return [_resolve_one(part) for part in spec.split("+")]


def _resolve_one(spec: str) -> str:
  if spec in SHIPPED:
    return os.path.join(CORPORA_DIR, SHIPPED[spec])
  if not os.path.isfile(spec):
    raise FileNotFoundError(f"corpus file not found: {spec!r} (not a file, nor a shipped corpus: {sorted(SHIPPED)})")
  return spec


def load_documents(spec: str, text_field: str = "text") -> List[str]:
  """Documents of every file in `spec`, in order."""
  docs = []
  for path in resolve(spec):
    docs.extend(_read_file(path, text_field))
  return docs


def load_text(spec: str, text_field: str = "text") -> str:
  """The corpus as one string, documents separated by a blank line."""
  return DOC_SEPARATOR.join(load_documents(spec, text_field))


def _read_file(path: str, text_field: str) -> List[str]:
  reader = _read_jsonl if path.endswith(".jsonl") else _read_txt
  docs = [d for d in reader(path, text_field) if d.strip()]
  if not docs:
    raise ValueError(f"corpus file {path} contains no text")
  return docs


def _read_txt(path: str, text_field: str) -> List[str]:
  del text_field
  # utf-8-sig drops a BOM; newline=None turns CRLF into LF.
  with open(path, encoding="utf-8-sig", newline=None) as f:
    text = f.read()
  lines = [line for line in text.split("\n") if line.strip()]
  if lines and all(line.rstrip().endswith(_EOU) for line in lines):
    return [_dialogue_text(line) for line in lines]
  return [strip_gutenberg(text)]


def _dialogue_text(line: str) -> str:
  return "\n".join(u.strip() for u in line.split(_EOU) if u.strip())


def strip_gutenberg(text: str) -> str:
  """The book without the Project Gutenberg header (through the START line) and footer (from the END line,
  plus the "End of Project Gutenberg's ..." note before it). Text without those lines is returned as is."""
  start = _GUTENBERG_START.search(text)
  if start:
    text = text[start.end():]
  end = _GUTENBERG_END.search(text)
  if end:
    text = text[:end.start()].rstrip()
    note = _GUTENBERG_END_NOTE.search(text, max(0, len(text) - 300))  # only in the last lines
    text = text[:note.start()] if note else text
  return text.strip() + "\n" if start or end else text


def _read_jsonl(path: str, text_field: str) -> List[str]:
  docs = []
  with open(path, encoding="utf-8-sig") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON: {e}") from e
      if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{path}:{lineno}: record has no text field {text_field!r} (has: {keys}); set data.text_field")
      if not isinstance(record[text_field], str):
        raise ValueError(f"{path}:{lineno}: field {text_field!r} is a {type(record[text_field]).__name__}, not a string")
      docs.append(record[text_field])
  return docs
