"""Text corpora: a shipped corpus name or a file path -> documents (strings).

Files are read into records, `{text_field: value}`-style dicts, and a format turns each record into
one document:
  `.jsonl`  one record per line, as written.
  `.txt`    one record holding the whole file (Project Gutenberg header/footer stripped, BOM and CRLF
            normalised); a DailyDialog file (every line ends in `__eou__`) is one record per line whose
            `text_field` is the list of utterances.
Formats (`data.format`): `text` (the text field; utterance lists one per line), `dolly`
(instruction/context/response as Optimus Prime formats them) and `dialogue` (HROM's
`<s><user> ...</s><assistant> ...</s>` turns).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Dict, List

CORPORA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpora")
SHIPPED = {
    "tinyshakespeare": os.path.join(CORPORA_DIR, "tinyshakespeare.txt"),
    "alice": os.path.join(CORPORA_DIR, "alice.txt"),
    "looking_glass": os.path.join(CORPORA_DIR, "looking_glass.txt"),
    "c4_sample": os.path.join(CORPORA_DIR, "c4_sample.jsonl"),
    "dailydialog_sample": os.path.join(CORPORA_DIR, "dailydialog_sample", "dialogues_text.txt"),
    "dolly_sample": os.path.join(CORPORA_DIR, "dolly_sample.jsonl"),  # records in the databricks-dolly-15k schema
}
# How the documents of a corpus are joined when read as one text.
DOC_SEPARATOR = "\n\n"
# HROM keeps the first 6 turns of a dialogue and marks them with these (a trained tokenizer keeps them whole).
DIALOGUE_MAX_TURNS = 6
DIALOGUE_MARKERS = ("<s>", "<user>", "<assistant>", "</s>")

Record = Dict[str, Any]

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", re.MULTILINE | re.IGNORECASE)
# The "End of [the] Project Gutenberg['s] ..." note just before the END line belongs to the footer too.
_GUTENBERG_END_NOTE = re.compile(r"^End of (the )?Project Gutenberg", re.MULTILINE | re.IGNORECASE)
_EOU = "__eou__"


# ---------------------------------------------------------------- corpus specs

def resolve(spec: str) -> List[str]:
  """File paths for a corpus spec: a path, a shipped name, or parts joined by '+' ('alice+looking_glass')."""
  spec = os.fspath(spec)
  if os.path.exists(spec) or "+" not in spec:
    return [_resolve_one(spec)]
  return [_resolve_one(part) for part in spec.split("+")]


def _resolve_one(spec: str) -> str:
  path = SHIPPED.get(spec, spec)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"corpus file not found: {path!r} (not a file, nor a shipped corpus: {sorted(SHIPPED)})")
  return path


def load_documents(spec: str, text_field: str = "text", format: str = "text") -> List[str]:
  """Documents of every file in `spec`, in order."""
  if format not in _FORMATS:
    raise ValueError(f"unknown data.format {format!r}; known: {sorted(_FORMATS)}")
  docs = []
  for path in resolve(spec):
    reader = _read_jsonl if path.endswith(".jsonl") else _read_txt
    records = reader(path, text_field)
    file_docs = [_FORMATS[format](rec, text_field, f"{path}:{line}") for line, rec in records]
    file_docs = [d for d in file_docs if d.strip()]
    if not file_docs:
      raise ValueError(f"corpus file {path} contains no text")
    docs.extend(file_docs)
  return docs


def load_text(spec: str, text_field: str = "text", format: str = "text") -> str:
  """The corpus as one string, documents separated by a blank line."""
  return DOC_SEPARATOR.join(load_documents(spec, text_field, format))


# ---------------------------------------------------------------- readers: file -> [(line, record)]

def _read_txt(path: str, text_field: str) -> List[tuple]:
  # utf-8-sig drops a BOM; newline=None turns CRLF into LF.
  with open(path, encoding="utf-8-sig", newline=None) as f:
    text = f.read()
  lines = text.split("\n")
  if any(line.strip() for line in lines) and all(line.rstrip().endswith(_EOU) for line in lines if line.strip()):
    return [(i, {text_field: _utterances(line)}) for i, line in enumerate(lines, 1) if line.strip()]
  return [(1, {text_field: strip_gutenberg(text)})]


def _utterances(line: str) -> List[str]:
  return [u.strip() for u in line.split(_EOU) if u.strip()]


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


def _read_jsonl(path: str, text_field: str) -> List[tuple]:
  del text_field
  records = []
  with open(path, encoding="utf-8-sig") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON: {e}") from e
      if not isinstance(record, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got a {type(record).__name__}")
      records.append((lineno, record))
  return records


# ---------------------------------------------------------------- formats: record -> document

def _field(record: Record, name: str, where: str, hint: str = "set data.text_field") -> Any:
  if name not in record:
    raise ValueError(f"{where}: record has no field {name!r} (has: {sorted(record)}); {hint}")
  return record[name]


def _is_utterances(value) -> bool:
  return isinstance(value, list) and all(isinstance(u, str) for u in value)


def _format_text(record: Record, text_field: str, where: str) -> str:
  value = _field(record, text_field, where)
  if isinstance(value, str):
    return value
  if _is_utterances(value):
    return "\n".join(value)
  raise ValueError(f"{where}: field {text_field!r} is a {type(value).__name__}, not a string or list of strings")


def _format_dolly(record: Record, text_field: str, where: str) -> str:
  del text_field
  hint = "format 'dolly' needs databricks-dolly-15k records"
  fields = {name: _field(record, name, where, hint) for name in ("instruction", "response")}
  context = record.get("context") or ""
  text = f"Instruction: {fields['instruction']}\n"
  if context:
    text += f"Context: {context}\n"
  return text + f"Response: {fields['response']}"


def _format_dialogue(record: Record, text_field: str, where: str) -> str:
  turns = _field(record, text_field, where)
  if not _is_utterances(turns):
    raise ValueError(f"{where}: format 'dialogue' needs field {text_field!r} to be a list of utterances "
                     f"(DailyDialog lines, or JSONL lists), got a {type(turns).__name__}")
  roles = ("<user>", "<assistant>")  # turns alternate, the user first
  body = "".join(f"{roles[i % 2]} {u}</s>" for i, u in enumerate(turns[:DIALOGUE_MAX_TURNS]))
  return "<s>" + body if body else ""


_FORMATS: Dict[str, Callable[[Record, str, str], str]] = {
    "text": _format_text,
    "dolly": _format_dolly,
    "dialogue": _format_dialogue,
}
