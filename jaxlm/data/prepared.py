"""Prepared datasets: a corpus tokenized once into a TFDS directory of ArrayRecord token records, cached.

    <data.cache_dir>/<corpus>-<tokenizer>-<hash>/
        jaxlm.json                    what was prepared: corpus, sources (sizes, sha256), tokenizer, counts
        tokenizer/                    the tokenizer the records were made with
        index/                        record_starts.i64, record_docs.i64 (see jaxlm.data.tfds_builder)
        tfds/jaxlm_tokens/1.0.0/      a TFDS dataset: tfds.builder_from_directory(...) loads it

The directory name is a hash of everything that decides the tokens (the corpus files' paths, sizes and
modification times or the catalog dataset's version, format, filters and tokenizer settings), so any config
naming the same data finds it. It is built under a temporary name and renamed when complete: a directory with
the final name is always whole, and an interrupted preparation is redone by the next call.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import socket
import time
import uuid
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

from jaxlm.data import catalog
from jaxlm.data import records as records_lib
from jaxlm.data import sources
from jaxlm.data import store as store_lib
from jaxlm.data import tokenize_pool
from jaxlm.data import tokenizers

FORMAT_VERSION = 2  # 2: tokens stored as uint16 when the vocabulary allows
# Corpora smaller than this are tokenized in the calling process (spawning workers costs more than it saves).
PARALLEL_MIN_BYTES = 32 << 20
# Tokenizers that learn a vocabulary (sentencepiece 'train:...') learn it from at most this much text.
TRAIN_SAMPLE_CHARS = 100 << 20
_FIELDS = ("corpus", "text_field", "format", "tokenizer", "tokenizer_path", "vocab_size", "min_chars", "loss_on",
           "tfds_data_dir", "language")
# Tokenizers that learn their vocabulary from the corpus: in a mixture they learn it from every component.
_LEARNS_VOCAB = lambda s: s["tokenizer"] == "char" or str(s["tokenizer_path"] or "").startswith("train:")


def default_cache_dir() -> str:
  """$JAXLM_DATA_CACHE, else ~/.cache/jaxlm/prepared ($XDG_CACHE_HOME/jaxlm/prepared)."""
  if os.environ.get("JAXLM_DATA_CACHE"):
    return os.environ["JAXLM_DATA_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxlm", "prepared")


def cache_dir(data_cfg: Mapping[str, Any]) -> str:
  path = str(data_cfg.get("cache_dir") or "") or default_cache_dir()
  if "://" in path:
    raise ValueError(f"data.cache_dir={path!r}: prepared datasets live on a local or mounted (NFS) directory")
  return os.path.abspath(os.path.expanduser(path))


def _settings(data_cfg: Mapping[str, Any]) -> Dict[str, Any]:
  values = {name: data_cfg.get(name) for name in _FIELDS}
  values["min_chars"] = int(values["min_chars"] or 0)
  values["loss_on"] = values["loss_on"] or "all"
  values["tfds_data_dir"] = values["tfds_data_dir"] or ""
  values["language"] = values["language"] or ""
  if data_cfg.get("vocab_from"):
    values["vocab_from"] = list(data_cfg["vocab_from"])
  return values


def components(data_cfg: Mapping[str, Any]) -> List[tuple]:
  """[(data settings of one corpus, weight)]: data.corpus alone (weight 1), or each 'SPEC=WEIGHT' of
  data.mixture ('c4_sample=3,alice=1'), all with the data section's other settings and one vocabulary. With
  data.replay = r > 0 the corpora of data.replay_corpus join them, sharing r of the examples (the others share
  1 - r in their own proportions); their settings carry "replay": True (trained on, not evaluated)."""
  values = dict(data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else data_cfg)
  mixture = str(values.get("mixture") or "").strip()
  parts = _mixture_parts(mixture) if mixture else [(str(values["corpus"]), 1.0)]
  replay = float(values.get("replay") or 0.0)
  old = replay_specs(values) if replay > 0 else []
  if replay > 0 and not old:
    raise ValueError(f"data.replay={replay}: no corpus to replay; set data.replay_corpus (a run from "
                     "train.init_from fills it with the corpora of the parent's history)")
  if not mixture and not old:
    return [(values, 1.0)]
  total = sum(w for _, w in parts)
  weighted = ([(spec, w * (1.0 - replay) / total, False) for spec, w in parts]
              + [(spec, replay / len(old), True) for spec in old])
  specs = [spec for spec, _, _ in weighted]
  vocab_from = specs if _LEARNS_VOCAB(_settings(values)) else []
  return [({**values, "corpus": spec, "mixture": "", "replay": 0.0, "replay_corpus": "", "vocab_from": vocab_from,
            "replay_component": is_replay}, weight) for spec, weight, is_replay in weighted]


def _mixture_parts(mixture: str) -> List[tuple]:
  parts = []
  for item in mixture.split(","):
    spec, sep, weight = item.strip().rpartition("=")
    try:
      weight = float(weight)
    except ValueError:
      weight = -1.0
    if not sep or not spec or weight <= 0:
      raise ValueError(f"data.mixture={mixture!r}: expected 'CORPUS=WEIGHT,CORPUS=WEIGHT' with weights > 0, "
                       f"got {item.strip()!r}")
    parts.append((spec, weight))
  return parts


def trained_specs(data_cfg: Mapping[str, Any]) -> List[str]:
  """The corpora data.corpus / data.mixture names (what a history entry records them as: see `label`)."""
  mixture = str(data_cfg.get("mixture") or "").strip()
  return [spec for spec, _ in _mixture_parts(mixture)] if mixture else [str(data_cfg.get("corpus"))]


def label(data_cfg: Mapping[str, Any]) -> str:
  """How a history entry names what a run trains on: data.mixture when set, else data.corpus."""
  return str(data_cfg.get("mixture") or "").strip() or str(data_cfg.get("corpus"))


def replay_specs(data_cfg: Mapping[str, Any]) -> List[str]:
  """The corpora of data.replay_corpus ('a,b') that the run does not already train on, each once."""
  current = set(trained_specs(data_cfg))
  specs = []
  for spec in str(data_cfg.get("replay_corpus") or "").split(","):
    spec = spec.strip()
    if spec and spec not in current and spec not in specs:
      specs.append(spec)
  return specs


def earlier_corpora(history: Sequence[Mapping[str, Any]]) -> List[str]:
  """The corpora a lineage's entries trained on (a mixture's components each), oldest first, each once."""
  specs = []
  for entry in history:
    name = str(entry.get("corpus") or "").strip()
    for spec in ([s for s, _ in _mixture_parts(name)] if "=" in name else [name]):
      if spec and spec not in specs:
        specs.append(spec)
  return specs


def _source_identity(settings: Mapping[str, Any]) -> List[Dict[str, Any]]:
  corpus = str(settings["corpus"])
  if catalog.is_catalog(corpus):
    return [{"tfds": corpus, "dir": catalog.dataset_dir(corpus, settings["tfds_data_dir"])}]
  identity = []
  for path in sources.resolve_files(corpus):
    st = os.stat(path)
    identity.append({"path": os.path.abspath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
  return identity


def dataset_key(data_cfg: Mapping[str, Any], tokenizer_digest: str = "") -> str:
  """'<corpus>-<tokenizer>-<hash>': the cache directory name of what `data_cfg` reads. `tokenizer_digest`
  (tokenizers.digest of a given vocabulary, e.g. one grown from a parent's) keeps datasets tokenized with it
  apart from those tokenized with the vocabulary the config would make."""
  settings = _settings(data_cfg)
  identity = {"format_version": FORMAT_VERSION, "record_tokens": records_lib.DEFAULT_RECORD_TOKENS,
              "sources": _source_identity(settings),
              **{k: settings[k] for k in _FIELDS if k not in ("corpus", "tfds_data_dir")}}
  if settings.get("vocab_from"):  # a mixture's shared vocabulary depends on every component
    identity["vocab_from"] = [_source_identity({**settings, "corpus": spec}) for spec in settings["vocab_from"]]
  if tokenizer_digest:
    identity["tokenizer_digest"] = tokenizer_digest
  digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
  slug = re.sub(r"[^A-Za-z0-9_.]+", "_", os.path.basename(str(settings["corpus"]).rstrip("/")))[:40].strip("_.")
  return f"{slug or 'corpus'}-{settings['tokenizer']}-{digest}"


def find(data_cfg: Mapping[str, Any], tokenizer_digest: str = "") -> Optional[str]:
  """The prepared dataset directory for `data_cfg`, or None when it has not been prepared (completely)."""
  root = os.path.join(cache_dir(data_cfg), dataset_key(data_cfg, tokenizer_digest))
  return root if os.path.isfile(os.path.join(root, store_lib.META_FILE)) else None


def ensure(data_cfg: Mapping[str, Any], *, tokenizer: Optional[tokenizers.Tokenizer] = None, progress: bool = True,
           workers: Optional[int] = None, tokenizer_digest: str = "") -> str:
  """The prepared dataset directory for `data_cfg`, preparing it first if needed."""
  return find(data_cfg, tokenizer_digest) or prepare(data_cfg, tokenizer=tokenizer, progress=progress,
                                                     workers=workers, tokenizer_digest=tokenizer_digest)


def find_all(data_cfg: Mapping[str, Any], tokenizer_digest: str = "") -> Optional[List[str]]:
  """The prepared dataset of every component (see `components`), or None if one is missing."""
  roots = [find(settings, tokenizer_digest) for settings, _ in components(data_cfg)]
  return None if None in roots else roots


def ensure_all(data_cfg: Mapping[str, Any], *, tokenizer: Optional[tokenizers.Tokenizer] = None,
               progress: bool = True, tokenizer_digest: str = "") -> List[str]:
  """`ensure` for every component; all are tokenized with the first one's tokenizer."""
  roots = []
  for settings, _ in components(data_cfg):
    roots.append(ensure(settings, tokenizer=tokenizer, progress=progress, tokenizer_digest=tokenizer_digest))
    tokenizer = tokenizer or load_tokenizer(roots[0])
  return roots


def load_tokenizer(root: str) -> tokenizers.Tokenizer:
  return tokenizers.load_tokenizer(os.path.join(root, store_lib.TOKENIZER_SUBDIR))


# ------------------------------------------------------------------------------------------ preparing
def _documents(settings: Mapping[str, Any]) -> Iterator[sources.Document]:
  return sources.iter_documents(str(settings["corpus"]), settings["text_field"] or "text",
                                settings["format"] or "text", min_chars=settings["min_chars"],
                                loss_on=settings["loss_on"], tfds_data_dir=settings["tfds_data_dir"],
                                language=settings["language"])


def _make_tokenizer(settings: Mapping[str, Any], work_dir: str) -> tokenizers.Tokenizer:
  """The tokenizer the config names; one that learns from the corpus reads it streaming (char: every
  character; sentencepiece 'train:...': the first TRAIN_SAMPLE_CHARS characters)."""
  every = [{**settings, "corpus": spec} for spec in settings.get("vocab_from") or [settings["corpus"]]]
  all_documents = lambda: (doc for each in every for doc in _documents(each))
  if settings["tokenizer"] == "char":
    chars = set(sources.DOC_SEPARATOR)
    for doc in all_documents():
      for text, _ in sources.document_parts(doc):
        chars.update(text)
    return tokenizers.CharTokenizer(sorted(chars))

  def sample() -> str:
    texts, size = [], 0
    for doc in all_documents():
      texts.append(sources.document_text(doc))
      size += len(texts[-1])
      if size >= TRAIN_SAMPLE_CHARS:
        break
    return sources.DOC_SEPARATOR.join(texts)
  return tokenizers.make_tokenizer(settings, sample, work_dir=work_dir)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def _remove_abandoned(parent: str, key: str) -> None:
  """Partial directories of `key` left by a preparation on this host whose process is gone."""
  prefix = f".partial-{key}-{socket.gethostname()}-"
  for name in os.listdir(parent) if os.path.isdir(parent) else []:
    if name.startswith(prefix):
      pid = int(name[len(prefix):].split("-")[0])
      try:
        os.kill(pid, 0)
      except ProcessLookupError:
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
      except PermissionError:
        pass


def prepare(data_cfg: Mapping[str, Any], *, tokenizer: Optional[tokenizers.Tokenizer] = None, progress: bool = True,
            workers: Optional[int] = None, tokenizer_digest: str = "") -> str:
  """Tokenizes the corpus `data_cfg` names into the cache (see the module docstring); returns the directory.

  `tokenizer` (e.g. a resumed run's) is used instead of making one. `workers`: tokenizer processes (None: the
  CPU count for corpora over PARALLEL_MIN_BYTES, else none)."""
  started = time.perf_counter()
  settings = _settings(data_cfg)
  if tokenizer_digest and (tokenizer is None or tokenizers.digest(tokenizer) != tokenizer_digest):
    raise ValueError(f"a dataset keyed by tokenizer digest {tokenizer_digest} must be prepared with that tokenizer")
  key = dataset_key(data_cfg, tokenizer_digest)
  parent = cache_dir(data_cfg)
  final = os.path.join(parent, key)
  os.makedirs(parent, exist_ok=True)
  _remove_abandoned(parent, key)
  partial = os.path.join(parent, f".partial-{key}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  try:
    tokenizer_dir = os.path.join(partial, store_lib.TOKENIZER_SUBDIR)
    os.makedirs(tokenizer_dir)
    tok = tokenizer or _make_tokenizer(settings, tokenizer_dir)
    tok.save(tokenizer_dir)
    source_ids = _source_identity(settings)
    input_bytes = sum(s.get("bytes", 0) for s in source_ids)
    if workers is None:
      workers = min(8, os.cpu_count() or 1) if input_bytes >= PARALLEL_MIN_BYTES else 0
    separator = [tok.eos_id] if tok.eos_id is not None else tok.encode(sources.DOC_SEPARATOR)
    with_loss = settings["loss_on"] != "all"
    counts = {"tokens": 0, "records": 0, "documents": 0}

    def records():
      pieces = tokenize_pool.tokenize(_documents(settings), tok, tokenizer_dir, workers)
      bar = _progress(progress, key)
      for record, starts_doc in records_lib.document_records(pieces, separator, with_loss=with_loss):
        counts["records"] += 1
        counts["documents"] += bool(starts_doc)
        counts["tokens"] += len(record["tokens"])
        if bar is not None:
          bar.update(len(record["tokens"]))
        yield record, starts_doc
      if bar is not None:
        bar.close()

    import tensorflow_datasets as tfds
    from jaxlm.data import tfds_builder  # TFDS is imported only to write (workers never need it)
    plan = tfds_builder.BuildPlan(records=records, index_dir=os.path.join(partial, store_lib.INDEX_SUBDIR),
                                  with_loss=with_loss, token_dtype="uint16" if tok.vocab_size <= 1 << 16 else "int32",
                                  description=f"jaxlm tokens of {settings['corpus']}",
                                  metadata={"jaxlm_key": key})
    builder = tfds_builder.JaxlmTokens(plan=plan, data_dir=os.path.join(partial, store_lib.TFDS_SUBDIR))
    with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints the temporary directory's name
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP))
    shutil.rmtree(os.path.join(partial, store_lib.TFDS_SUBDIR, "downloads"), ignore_errors=True)
    for s in source_ids:
      if "path" in s:
        s["sha256"] = _sha256(s["path"])
    meta = {"key": key, "format_version": FORMAT_VERSION, "settings": settings, "sources": source_ids,
            "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "dir": store_lib.TOKENIZER_SUBDIR},
            "separator": [int(i) for i in separator], "record_tokens": records_lib.DEFAULT_RECORD_TOKENS,
            **counts, "workers": workers, "seconds": round(time.perf_counter() - started, 3),
            "split": "one stream; training reads its first 1 - data.val_fraction as train, the rest as validation",
            "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(os.path.join(partial, store_lib.META_FILE), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1)
    try:
      os.rename(partial, final)
    except OSError:  # another process finished the same dataset first: theirs is as good
      if not os.path.isfile(os.path.join(final, store_lib.META_FILE)):
        raise
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  return final


def _progress(enabled: bool, key: str):
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(desc=f"prepare {key}", unit="tok", unit_scale=True, dynamic_ncols=True, mininterval=1.0)
