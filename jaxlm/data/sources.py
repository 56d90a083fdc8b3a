"""Text corpora: a shipped corpus name or a file path -> documents (strings).

Files are read into records, `{text_field: value}`-style dicts, and a format turns each record into
one document:
  `.jsonl`  one record per line, as written.
  `.txt`    one record holding the whole file (Project Gutenberg header/footer stripped, BOM and CRLF
            normalised); a DailyDialog file (every line ends in `__eou__`) is one record per line whose
            `text_field` is the list of utterances.
`.jsonl.gz` / `.json.gz` (C4's shard format) are read as JSONL. Files are streamed: memory does not grow with
their size (a plain-text file over STREAM_TXT_BYTES becomes one document read in chunks, without the Gutenberg
stripping). Globs name several files ('c4-train.*-of-01024.json.gz').
Formats (`data.format`): `text` (the text field; utterance lists one per line), `dolly`
(instruction/context/response as Optimus Prime formats them) and `dialogue` (HROM's
`<s><user> ...</s><assistant> ...</s>` turns).
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
from typing import Any, Callable, Dict, Iterable, Iterator, List, Tuple, Union

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
# A document is a string; a list of (text, loss) parts when the loss covers only some of it (data.loss_on); or
# a `TextChunks` when it is a text file too big to hold.
Part = Tuple[str, bool]
Document = Union[str, List[Part], "TextChunks"]
# Plain-text files above this size are streamed in chunks instead of read whole.
STREAM_TXT_BYTES = 64 << 20
_CHUNK_CHARS = 1 << 20
# A DailyDialog file is recognised from its first lines (a big file is never read whole to decide).
_SNIFF_LINES = 50
LOSS_ON = ("all", "response")

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", re.MULTILINE | re.IGNORECASE)
# The "End of [the] Project Gutenberg['s] ..." note just before the END line belongs to the footer too.
_GUTENBERG_END_NOTE = re.compile(r"^End of (the )?Project Gutenberg", re.MULTILINE | re.IGNORECASE)
_EOU = "__eou__"


# ---------------------------------------------------------------- corpus specs

def resolve_files(spec: str) -> List[str]:
  """File paths for a corpus spec: a path, a shipped name, a glob (expanded sorted, so every process sees the
  same order), or parts joined by '+' ('alice+looking_glass')."""
  spec = os.fspath(spec)
  parts = [spec] if os.path.exists(spec) or "+" not in spec else spec.split("+")
  files = []
  for part in parts:
    if glob.has_magic(part) and part not in SHIPPED:
      matches = sorted(p for p in glob.glob(part) if os.path.isfile(p))
      if not matches:
        raise FileNotFoundError(f"corpus glob {part!r} matches no file")
      files.extend(matches)
    else:
      files.append(_resolve_one(part))
  return files


resolve = resolve_files


def _resolve_one(spec: str) -> str:
  path = SHIPPED.get(spec, spec)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"corpus file not found: {path!r} (not a file, nor a shipped corpus: {sorted(SHIPPED)})")
  return path


def load_documents(spec: str, text_field: str = "text", format: str = "text") -> List[str]:
  """Documents of every file in `spec`, in order, as strings (a small corpus held in memory)."""
  return [document_text(doc) for doc in iter_documents(spec, text_field, format)]


def iter_documents(spec: str, text_field: str = "text", format: str = "text", *, min_chars: int = 0,
                   loss_on: str = "all", tfds_data_dir: str = "", language: str = "") -> Iterator[Document]:
  """Streams the documents of every file in `spec` (paths, shipped names, globs, joined by '+'), in order.

  `min_chars` drops shorter documents (HRM-Text1 drops C4 texts of <= 100 characters). `loss_on='response'`
  yields (text, loss) parts whose loss is True only on what the model answers (assistant turns, Dolly
  responses). A `tfds:NAME[/CONFIG][:VERSION]` spec reads that catalog dataset's train split from
  `tfds_data_dir` (see jaxlm.data.catalog). `language` (an ISO 639-1 code, e.g. 'en') keeps only documents
  langdetect says are in it (pip install langdetect)."""
  if format not in _FORMATS:
    raise ValueError(f"unknown data.format {format!r}; known: {sorted(_FORMATS)}")
  if loss_on not in LOSS_ON:
    raise ValueError(f"unknown data.loss_on {loss_on!r}; known: {list(LOSS_ON)}")
  from jaxlm.data import catalog
  in_language = _language_filter(language)
  paths = [spec] if catalog.is_catalog(spec) else resolve_files(spec)
  for path in paths:
    kept = 0
    records = catalog.records(path, tfds_data_dir) if catalog.is_catalog(path) else _records(path, text_field)
    for where, record in records:
      if isinstance(record, TextChunks):
        if format != "text":
          raise ValueError(f"{path}: a plain-text file of {os.path.getsize(path):,} bytes is one streamed document; "
                           f"data.format={format!r} needs records (JSONL or DailyDialog lines)")
        kept += 1
        yield record
        continue
      parts = _FORMATS[format](record, text_field, f"{path}:{where}")
      text = document_text(parts)
      if not text.strip() or len(text) < min_chars or not in_language(text):
        continue
      kept += 1
      yield (text if loss_on == "all" or isinstance(parts, str) else parts)
    if not kept:
      raise ValueError(f"corpus file {path} contains no text" + (f" (with data.min_chars={min_chars})" if min_chars else "")
                       + (f" (with data.language={language!r})" if language else ""))


def _language_filter(language: str) -> Callable[[str], bool]:
  """text -> whether langdetect detects `language` in it (always True when `language` is '')."""
  if not language:
    return lambda text: True
  try:
    import langdetect
  except ImportError as e:
    raise ImportError(f"data.language={language!r} needs the langdetect package: pip install langdetect") from e
  langdetect.DetectorFactory.seed = 0  # its sampling is random otherwise: every run must keep the same documents

  def in_language(text: str) -> bool:
    try:
      return langdetect.detect(text[:2000]) == language
    except langdetect.LangDetectException:  # no letters at all
      return False
  return in_language


def document_text(doc: Document) -> str:
  if isinstance(doc, str):
    return doc
  if isinstance(doc, TextChunks):
    return "".join(doc)
  return "".join(text for text, _ in doc)


def document_parts(doc: Document) -> Iterator[Part]:
  """(text, loss) pieces of a document, streamed (a TextChunks document in chunks, all with loss)."""
  if isinstance(doc, str):
    yield doc, True
  elif isinstance(doc, TextChunks):
    yield from ((chunk, True) for chunk in doc)
  else:
    yield from doc


class TextChunks:
  """A big plain-text file as one document, read in ~1M-character chunks cut after a newline."""

  def __init__(self, path: str):
    self.path = path

  def __iter__(self) -> Iterator[str]:
    with _open_text(self.path) as f:
      carry = ""
      while True:
        block = f.read(_CHUNK_CHARS)
        if not block:
          break
        block = carry + block
        cut = block.rfind("\n") + 1
        if cut == 0:
          carry = block
          continue
        carry = block[cut:]
        yield block[:cut]
      if carry:
        yield carry


def load_text(spec: str, text_field: str = "text", format: str = "text") -> str:
  """The corpus as one string, documents separated by a blank line."""
  return DOC_SEPARATOR.join(load_documents(spec, text_field, format))


# ---------------------------------------------------------------- readers: file -> (line, record)

def _open_text(path: str):
  # utf-8-sig drops a BOM; newline=None turns CRLF into LF; .gz files are decompressed as they are read.
  if path.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8-sig", newline=None)
  return open(path, encoding="utf-8-sig", newline=None)


def _records(path: str, text_field: str) -> Iterator[Tuple[int, Any]]:
  if path.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
    return _read_jsonl(path, text_field)
  return _read_txt(path, text_field)


def _is_dialogue_file(path: str) -> bool:
  lines = []
  with _open_text(path) as f:
    for line in f:
      if line.strip():
        lines.append(line)
      if len(lines) >= _SNIFF_LINES:
        break
  return bool(lines) and all(line.rstrip().endswith(_EOU) for line in lines)


def _read_txt(path: str, text_field: str) -> Iterator[Tuple[int, Any]]:
  if _is_dialogue_file(path):
    with _open_text(path) as f:
      for i, line in enumerate(f, 1):
        if line.strip():
          yield i, {text_field: _utterances(line)}
    return
  if os.path.getsize(path) > STREAM_TXT_BYTES:
    yield 1, TextChunks(path)
    return
  with _open_text(path) as f:
    text = f.read()
  yield 1, {text_field: strip_gutenberg(text)}


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


def _read_jsonl(path: str, text_field: str) -> Iterator[Tuple[int, Any]]:
  del text_field
  with _open_text(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON: {e}") from e
      if not isinstance(record, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got a {type(record).__name__}")
      yield lineno, record


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


def _format_dolly(record: Record, text_field: str, where: str) -> List[Part]:
  """Optimus Prime's template; the loss part (data.loss_on='response') is the response."""
  del text_field
  hint = "format 'dolly' needs databricks-dolly-15k records"
  fields = {name: _field(record, name, where, hint) for name in ("instruction", "response")}
  context = record.get("context") or ""
  prompt = f"Instruction: {fields['instruction']}\n"
  if context:
    prompt += f"Context: {context}\n"
  return [(prompt + "Response: ", False), (str(fields["response"]), True)]


def _format_dialogue(record: Record, text_field: str, where: str) -> List[Part]:
  """HROM's turns; the loss parts (data.loss_on='response') are the assistant turns."""
  turns = _field(record, text_field, where)
  if not _is_utterances(turns):
    raise ValueError(f"{where}: format 'dialogue' needs field {text_field!r} to be a list of utterances "
                     f"(DailyDialog lines, or JSONL lists), got a {type(turns).__name__}")
  roles = ("<user>", "<assistant>")  # turns alternate, the user first
  body = [(f"{roles[i % 2]} {u}</s>", i % 2 == 1) for i, u in enumerate(turns[:DIALOGUE_MAX_TURNS])]
  return [("<s>", False)] + body if body else []


_FORMATS: Dict[str, Callable[[Record, str, str], Union[str, List[Part]]]] = {
    "text": _format_text,
    "dolly": _format_dolly,
    "dialogue": _format_dialogue,
}
