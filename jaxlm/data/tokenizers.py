"""Tokenizers behind one small interface, saved as `tokenizer.json` so a resumed run reuses its vocabulary.

Kinds: `char` (sorted unique characters), `sentencepiece` (a .model file, default the shipped T5 one,
or one trained on the corpus), `gpt2` (tiktoken BPE from the shipped encoder.json/vocab.bpe, never
downloaded) and `ids` (text is already a list of token ids). Each kind registers itself in `_KINDS`; nothing dispatches in an if-chain.
"""
from __future__ import annotations

import abc
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
T5_SPIECE_MODEL = os.path.join(ASSETS_DIR, "t5", "spiece.model")
GPT2_ASSETS_DIR = os.path.join(ASSETS_DIR, "gpt2")
TOKENIZER_FILE = "tokenizer.json"

_KINDS: Dict[str, type] = {}


def _register(kind: str):
  def wrap(cls):
    cls.kind = kind
    _KINDS[kind] = cls
    return cls
  return wrap


class Tokenizer(abc.ABC):
  """text <-> token ids. Special ids are None when the tokenizer has no such token."""
  kind = "base"
  eos_id: Optional[int] = None
  pad_id: Optional[int] = None
  bos_id: Optional[int] = None

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can produce (ids are 0..vocab_size-1)."""

  @abc.abstractmethod
  def encode(self, text: str) -> List[int]:
    ...

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    ...

  def encode_array(self, text: str):
    """`encode` as an int32 numpy array (what data preparation stores); kinds may do it faster."""
    import numpy as np
    return np.asarray(self.encode(text), np.int32)

  @abc.abstractmethod
  def _config(self, directory: str) -> Dict[str, Any]:
    """The JSON fields (besides "kind") that rebuild this tokenizer; may copy files into `directory`."""

  @classmethod
  @abc.abstractmethod
  def _from_config(cls, config: Mapping[str, Any], directory: str) -> "Tokenizer":
    ...

  def save(self, directory: str) -> str:
    """Writes `directory/tokenizer.json` (plus any files it refers to) and returns its path."""
    os.makedirs(directory, exist_ok=True)
    config = {"kind": self.kind, **self._config(directory)}
    path = os.path.join(directory, TOKENIZER_FILE)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(config, f, ensure_ascii=False, indent=1)
    return path

  def __repr__(self) -> str:
    return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos={self.eos_id}, pad={self.pad_id}, bos={self.bos_id})"


def digest(tokenizer: Tokenizer) -> str:
  """A short hash of everything `tokenizer.save` writes: equal digests, equal tokenizers."""
  hasher = hashlib.sha256()
  with tempfile.TemporaryDirectory(prefix="jaxlm-tokenizer-digest-") as directory:
    tokenizer.save(directory)
    for name in sorted(os.listdir(directory)):
      hasher.update(name.encode() + b"\0")
      with open(os.path.join(directory, name), "rb") as f:
        hasher.update(f.read())
  return hasher.hexdigest()[:16]


def load_tokenizer(directory: str) -> Tokenizer:
  """Rebuilds the tokenizer that `Tokenizer.save(directory)` wrote."""
  path = os.path.join(directory, TOKENIZER_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no saved tokenizer: {path} does not exist")
  with open(path, encoding="utf-8") as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from e
  kind = config.get("kind") if isinstance(config, dict) else None
  if kind not in _KINDS:
    raise ValueError(f"{path}: unknown tokenizer kind {kind!r}; known kinds: {sorted(_KINDS)}")
  try:
    return _KINDS[kind]._from_config(config, directory)
  except KeyError as e:
    raise ValueError(f"{path}: missing field {e.args[0]!r} for tokenizer kind {kind!r}") from e


def _check_ids(ids: Sequence[int], vocab_size: int, kind: str) -> List[int]:
  ids = [int(i) for i in ids]
  bad = [i for i in ids if not 0 <= i < vocab_size]
  if bad:
    raise ValueError(f"{kind} tokenizer: id {bad[0]} is outside the vocabulary [0, {vocab_size})")
  return ids


@_register("char")
class CharTokenizer(Tokenizer):
  """One id per character, ids in sorted character order (nanoGPT's shakespeare_char)."""

  def __init__(self, chars: Iterable[str]):
    self.chars = list(chars)
    if not self.chars or any(len(c) != 1 for c in self.chars) or len(set(self.chars)) != len(self.chars):
      raise ValueError("CharTokenizer needs a non-empty list of distinct single characters")
    self._index = {c: i for i, c in enumerate(self.chars)}

  @classmethod
  def train(cls, text: str) -> "CharTokenizer":
    if not text:
      raise ValueError("CharTokenizer.train got empty text")
    return cls(sorted(set(text)))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> List[int]:
    try:
      return [self._index[c] for c in text]
    except KeyError as e:
      c = e.args[0]
      raise ValueError(f"character {c!r} (U+{ord(c):04X}) is not in the char vocabulary of {self.vocab_size} characters; "
                       "the vocabulary comes from the training corpus (or the saved tokenizer.json)") from None

  def encode_array(self, text: str):
    """Vectorised: a table from code point to id (-1: not in the vocabulary), ~10x `encode`."""
    import numpy as np
    if not hasattr(self, "_id_of_point"):
      table = np.full(max(ord(c) for c in self.chars) + 2, -1, np.int32)  # the last entry: every larger point
      table[[ord(c) for c in self.chars]] = np.arange(len(self.chars), dtype=np.int32)
      self._id_of_point = table
    points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    ids = self._id_of_point[np.minimum(points, len(self._id_of_point) - 1)]
    if (ids < 0).any():
      self.encode(text[int(np.argmax(ids < 0))])  # raises the same error as encode
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    return "".join(self.chars[i] for i in _check_ids(ids, self.vocab_size, self.kind))

  def extended(self, text: str) -> "CharTokenizer":
    """This vocabulary with the characters of `text` it lacks appended (sorted): old ids keep their meaning."""
    return CharTokenizer(self.chars + sorted(set(text) - set(self.chars)))

  def _config(self, directory):
    return {"chars": self.chars}

  @classmethod
  def _from_config(cls, config, directory):
    return cls(config["chars"])


@_register("sentencepiece")
class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model; `extra_ids` sentinel ids follow its pieces (T5: 32000 pieces + 100 = 32100).

  As in T5, sentinel `<extra_id_k>` has id vocab_size - 1 - k.
  """

  def __init__(self, model_file: str = T5_SPIECE_MODEL, extra_ids: int = 0):
    import sentencepiece as spm
    if not os.path.isfile(model_file):
      raise FileNotFoundError(f"sentencepiece model not found: {model_file}")
    if extra_ids < 0:
      raise ValueError(f"extra_ids must be >= 0, got {extra_ids}")
    self.model_file = os.path.abspath(model_file)
    self.extra_ids = int(extra_ids)
    self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
    self._pieces = self._sp.get_piece_size()
    # sentencepiece reports absent specials as -1.
    self.pad_id, self.eos_id, self.bos_id = (
        i if i >= 0 else None for i in (self._sp.pad_id(), self._sp.eos_id(), self._sp.bos_id()))

  @classmethod
  def train(cls, source, vocab_size: int, model_prefix_dir: str, *, model_type: str = "unigram",
            character_coverage: float = 1.0, hard_vocab_limit: bool = True,
            user_defined_symbols: Sequence[str] = (), eos_piece: str = "</s>",
            extra_ids: int = 0) -> "SentencePieceTokenizer":
    """Trains `model_prefix_dir/spiece.model` with T5's specials (pad=0, eos=1, unk=2, no bos).

    `source`: a file path, or an iterable of texts and/or file paths (os.PathLike, or a string naming
    an existing file). Texts are split into lines, as sentencepiece trains on sentences.
    `hard_vocab_limit=False` lets a small corpus give fewer than `vocab_size` pieces instead of failing;
    `user_defined_symbols` are always kept as single pieces (e.g. dialogue role markers); text never
    encodes to the eos piece, so a marker spelled like it needs another `eos_piece`.
    """
    import sentencepiece as spm
    os.makedirs(model_prefix_dir, exist_ok=True)
    prefix = os.path.join(model_prefix_dir, "spiece")
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(source), model_prefix=prefix, vocab_size=int(vocab_size),
        model_type=model_type, character_coverage=character_coverage, hard_vocab_limit=hard_vocab_limit,
        user_defined_symbols=list(user_defined_symbols), eos_piece=eos_piece,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2, num_threads=max(1, min(4, os.cpu_count() or 1)))
    return cls(prefix + ".model", extra_ids=extra_ids)

  @property
  def vocab_size(self) -> int:
    return self._pieces + self.extra_ids

  def encode(self, text: str) -> List[int]:
    return self._sp.encode(text, out_type=int)

  def decode(self, ids: Sequence[int]) -> str:
    ids = _check_ids(ids, self.vocab_size, self.kind)
    # sentencepiece cannot decode sentinel ids, so decode the runs between them.
    parts, run = [], []
    for i in ids + [None]:
      if i is not None and i < self._pieces:
        run.append(i)
        continue
      text = self._sp.decode(run)
      # sentencepiece drops the word-start space of the first piece; keep it when a sentinel precedes.
      if parts and run and self._sp.id_to_piece(run[0]).startswith("\u2581"):
        text = " " + text
      parts.append(text)
      if i is not None:
        parts.append(f"<extra_id_{self.vocab_size - 1 - i}>")
      run = []
    return "".join(parts)

  def _config(self, directory):
    name = os.path.basename(self.model_file)
    target = os.path.join(directory, name)
    if not os.path.exists(target) or not os.path.samefile(self.model_file, target):
      shutil.copyfile(self.model_file, target)
    return {"model_file": name, "extra_ids": self.extra_ids}

  @classmethod
  def _from_config(cls, config, directory):
    # No model_file: the T5 model shipped with jaxlm (keeps converted model directories portable).
    name = config.get("model_file")
    path = os.path.join(directory, name) if name else T5_SPIECE_MODEL
    return cls(path, extra_ids=int(config.get("extra_ids", 0)))


def _training_lines(source) -> Iterable[str]:
  if isinstance(source, (str, os.PathLike)):
    source = [source]
  for item in source:
    is_file = isinstance(item, os.PathLike) or ("\n" not in item and len(item) < 4096 and os.path.isfile(item))
    if is_file:
      with open(item, encoding="utf-8-sig") as f:
        lines = f.read().splitlines()
    else:
      lines = item.splitlines()
    yield from (line for line in lines if line.strip())


# The r50k/gpt2 pre-tokenizer regex.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = "<|endoftext|>"


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


@functools.lru_cache(maxsize=4)
def _gpt2_encoding(assets_dir: str):
  import tiktoken
  import tiktoken.load
  vocab_bpe, encoder_json = (os.path.join(assets_dir, n) for n in ("vocab.bpe", "encoder.json"))
  for path in (vocab_bpe, encoder_json):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"GPT-2 BPE file not found: {path}")
  # tiktoken caches files by path only; passing the hashes stops it serving a stale copy.
  ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
      vocab_bpe, encoder_json, vocab_bpe_hash=_sha256(vocab_bpe), encoder_json_hash=_sha256(encoder_json))
  eot = len(ranks)  # 50256 for GPT-2
  return tiktoken.Encoding("gpt2_local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                           special_tokens={GPT2_EOT: eot}, explicit_n_vocab=eot + 1)


@_register("gpt2")
class GPT2Tokenizer(Tokenizer):
  """GPT-2 byte-level BPE. <|endoftext|> is eos and bos (as in GPT-2); there is no pad token.

  `encode` never turns text into special tokens (tiktoken's encode_ordinary).
  """

  def __init__(self, assets_dir: Optional[str] = None):
    self.assets_dir = os.path.abspath(assets_dir) if assets_dir else None
    self._enc = _gpt2_encoding(self.assets_dir or GPT2_ASSETS_DIR)
    self.eos_id = self.bos_id = self._enc.eot_token

  @property
  def vocab_size(self) -> int:
    return self._enc.n_vocab

  def encode(self, text: str) -> List[int]:
    return self._enc.encode_ordinary(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._enc.decode(_check_ids(ids, self.vocab_size, self.kind))

  def _config(self, directory):
    if self.assets_dir is None:
      return {"assets_dir": None}  # the shipped files
    for name in ("encoder.json", "vocab.bpe"):
      target = os.path.join(directory, name)
      if not os.path.exists(target) or not os.path.samefile(os.path.join(self.assets_dir, name), target):
        shutil.copyfile(os.path.join(self.assets_dir, name), target)
    return {"assets_dir": "."}

  @classmethod
  def _from_config(cls, config, directory):
    assets = config.get("assets_dir")
    return cls(os.path.join(directory, assets) if assets else None)


@_register("vocab")
class VocabTokenizer(Tokenizer):
  """An explicit id -> token list (the original's char vocabulary with <PAD> <UNK> <BOS> <EOS> first).

  encode: one id per character, <UNK> for characters not in the vocabulary; decode drops <PAD> (id 0) only,
  as the original does (HRM's continual_tokenizer.json becomes this kind).
  """

  def __init__(self, tokens: Sequence[str], level: str = "char", pad_id: Optional[int] = 0,
               unk_id: Optional[int] = 1, bos_id: Optional[int] = 2, eos_id: Optional[int] = 3):
    self.tokens, self.level = list(tokens), level
    if level != "char":
      raise ValueError(f"vocab tokenizer: level {level!r} is not supported (only 'char')")
    if len(set(self.tokens)) != len(self.tokens):
      raise ValueError("vocab tokenizer: the token list has duplicates")
    self.pad_id, self.unk_id, self.bos_id, self.eos_id = pad_id, unk_id, bos_id, eos_id
    self._index = {t: i for i, t in enumerate(self.tokens)}

  @property
  def vocab_size(self) -> int:
    return len(self.tokens)

  def encode(self, text: str) -> List[int]:
    if self.unk_id is None:
      return [self._index[c] for c in text]
    return [self._index.get(c, self.unk_id) for c in text]

  def decode(self, ids: Sequence[int]) -> str:
    ids = _check_ids(ids, self.vocab_size, self.kind)
    return "".join(self.tokens[i] for i in ids if i != self.pad_id)

  def extended(self, text: str) -> "VocabTokenizer":
    """This vocabulary with the characters of `text` it lacks appended (sorted), as the original's continual
    tokenizer grows: old ids keep their meaning."""
    return VocabTokenizer(self.tokens + sorted(set(text) - set(self.tokens)), self.level, self.pad_id,
                          self.unk_id, self.bos_id, self.eos_id)

  def vocab(self) -> Dict[str, int]:
    return {t: i for i, t in enumerate(self.tokens)}

  def _config(self, directory):
    return {"level": self.level, "tokens": self.tokens, "pad_id": self.pad_id, "unk_id": self.unk_id,
            "bos_id": self.bos_id, "eos_id": self.eos_id}

  @classmethod
  def _from_config(cls, config, directory):
    return cls(config["tokens"], config.get("level", "char"), config.get("pad_id"), config.get("unk_id"),
               config.get("bos_id"), config.get("eos_id"))


@_register("ids")
class IdsTokenizer(Tokenizer):
  """Identity tokenizer for models whose real tokenizer is unknown: text is '1 2 3' or '1,2,3'."""

  def __init__(self, vocab_size: int, eos_id: Optional[int] = None, pad_id: Optional[int] = None,
               bos_id: Optional[int] = None):
    if int(vocab_size) <= 0:
      raise ValueError(f"the ids tokenizer needs vocab_size > 0 (set data.vocab_size), got {vocab_size}")
    self._vocab_size = int(vocab_size)
    self.eos_id, self.pad_id, self.bos_id = eos_id, pad_id, bos_id

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  def encode(self, text: str) -> List[int]:
    fields = [f for f in re.split(r"[\s,]+", text) if f]
    try:
      ids = [int(f) for f in fields]
    except ValueError:
      bad = next(f for f in fields if not re.fullmatch(r"[+-]?\d+", f))
      raise ValueError(f"ids tokenizer: {bad!r} is not an integer token id") from None
    return _check_ids(ids, self.vocab_size, self.kind)

  def decode(self, ids: Sequence[int]) -> str:
    return " ".join(str(i) for i in _check_ids(ids, self.vocab_size, self.kind))

  def _config(self, directory):
    return {"vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id, "bos_id": self.bos_id}

  @classmethod
  def _from_config(cls, config, directory):
    return cls(config["vocab_size"], config.get("eos_id"), config.get("pad_id"), config.get("bos_id"))


SP_TRAIN_PREFIX = "train:"  # data.tokenizer_path 'train:bpe' / 'train:unigram' trains a model on the corpus


def _sentencepiece_from_config(data_cfg, train_text_fn, work_dir) -> SentencePieceTokenizer:
  path = _cfg(data_cfg, "tokenizer_path") or T5_SPIECE_MODEL
  wanted = int(_cfg(data_cfg, "vocab_size") or 0)
  if path.startswith(SP_TRAIN_PREFIX):
    return _train_sentencepiece(path[len(SP_TRAIN_PREFIX):], wanted, train_text_fn, work_dir)
  pieces = SentencePieceTokenizer(path).vocab_size
  # Ids a model has beyond the pieces are T5-style sentinels (data.vocab_size 32100 -> 100 extra ids).
  return SentencePieceTokenizer(path, extra_ids=max(0, wanted - pieces))


def _train_sentencepiece(model_type, vocab_size, train_text_fn, work_dir) -> SentencePieceTokenizer:
  from jaxlm.data.sources import DIALOGUE_MARKERS
  if model_type not in ("bpe", "unigram"):
    raise ValueError(f"data.tokenizer_path={SP_TRAIN_PREFIX + model_type!r}: use 'train:bpe' or 'train:unigram'")
  if vocab_size <= 0:
    raise ValueError(f"data.tokenizer_path={SP_TRAIN_PREFIX + model_type!r} needs data.vocab_size > 0")
  text = train_text_fn()
  markers = [m for m in DIALOGUE_MARKERS if m in text]
  # A small corpus may support fewer pieces than asked; the model's vocabulary (data.vocab_size) still fits them.
  return SentencePieceTokenizer.train(
      [text], vocab_size, work_dir or tempfile.mkdtemp(prefix="jaxlm_spm_"), model_type=model_type,
      hard_vocab_limit=False, user_defined_symbols=markers, eos_piece="<eos>" if "</s>" in markers else "</s>")


_FACTORIES: Dict[str, Callable[[Any, Callable[[], str], Optional[str]], Tokenizer]] = {
    "char": lambda cfg, train_text_fn, _: CharTokenizer.train(train_text_fn()),
    "sentencepiece": _sentencepiece_from_config,
    "gpt2": lambda cfg, *_: GPT2Tokenizer(_cfg(cfg, "tokenizer_path") or None),
    "ids": lambda cfg, *_: IdsTokenizer(int(_cfg(cfg, "vocab_size") or 0)),
}


def _cfg(data_cfg, field: str, default=None):
  return data_cfg.get(field, default) if hasattr(data_cfg, "get") else getattr(data_cfg, field, default)


def make_tokenizer(data_cfg, train_text_fn: Callable[[], str], work_dir: Optional[str] = None) -> Tokenizer:
  """Builds the tokenizer named by `data.tokenizer`.

  `train_text_fn()` gives the text a vocabulary is trained on; it is only called by kinds that train
  (`char`, and `sentencepiece` with tokenizer_path 'train:bpe'/'train:unigram'). A trained
  sentencepiece model is written to `work_dir` (a temporary directory if None).
  """
  kind = _cfg(data_cfg, "tokenizer", "char")
  if kind not in _FACTORIES:
    raise ValueError(f"unknown data.tokenizer {kind!r}; known: {sorted(_FACTORIES)}")
  return _FACTORIES[kind](data_cfg, train_text_fn, work_dir)


# HROM's Hugging Face BPE lives in its own module; importing it registers kind 'hrom_bpe' (its saved form and its
# data.tokenizer factory), whichever of the two modules is imported first.
from jaxlm.data import hrom_tokenizer as _hrom  # noqa: E402,F401  (needs the definitions above)
