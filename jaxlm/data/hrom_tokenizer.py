"""HROM-V1's own tokenizer: a Hugging Face `tokenizers` ByteLevel BPE saved as `tokenizer/hrom_tokenizer.json`.

jaxlm runs the original's file through the same library, so ids and text are the original's, quirks included:
- every `encode` appends `</s>` (id 2; the file's TemplateProcessing post-processor);
- the model has no unk token, so bytes never seen in training are silently dropped;
- `decode` skips special tokens and its text starts with a space (ByteLevel add_prefix_space).
The original file's text is kept verbatim in jaxlm's tokenizer.json (field `hf_tokenizer`), so an export writes
back the same bytes. `train` builds a new one exactly as the original's TokenizerTrainer does.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, List, Optional, Sequence

from jaxlm.data import tokenizers as base

KIND = "hrom_bpe"
# Where the original reads and writes it, relative to its working directory (its checkpoints go to checkpoints/).
ORIGINAL_PATH = os.path.join("tokenizer", "hrom_tokenizer.json")
# The original BpeTrainer's special tokens, in its order: their ids are 0-5.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>")


def _library():
  try:
    import tokenizers
  except ImportError as e:  # an optional dependency for every other family
    raise ImportError("HROM's tokenizer needs the Hugging Face `tokenizers` package (pip install tokenizers)") from e
  return tokenizers


@base._register(KIND)
class HromTokenizer(base.Tokenizer):
  """The original's tokenizer object, built from the text of its hrom_tokenizer.json."""

  def __init__(self, file_text: str, where: str = "hrom tokenizer"):
    try:
      self._tok = _library().Tokenizer.from_str(file_text)
    except Exception as e:  # the library raises a bare Exception on malformed JSON
      raise ValueError(f"{where}: not a Hugging Face tokenizers file ({e})") from None
    self.file_text = file_text
    missing = [t for t in SPECIAL_TOKENS if self._tok.token_to_id(t) != SPECIAL_TOKENS.index(t)]
    if missing:
      raise ValueError(f"{where}: special tokens {missing} are not at the original's ids "
                       f"{ {t: i for i, t in enumerate(SPECIAL_TOKENS)} }")
    self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

  @classmethod
  def from_file(cls, path: str) -> "HromTokenizer":
    with open(path, "rb") as f:
      raw = f.read()
    try:
      return cls(raw.decode("utf-8"), where=path)
    except UnicodeDecodeError as e:
      raise ValueError(f"{path}: not UTF-8 text ({e})") from None

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int = 32000, min_frequency: int = 2) -> "HromTokenizer":
    """TokenizerTrainer.train of HROM_Trainer.py: BPE without unk, ByteLevel(add_prefix_space=True) pre-tokenizer
    and decoder, BpeTrainer(vocab_size, SPECIAL_TOKENS, min_frequency=2), then `$A </s>` post-processing."""
    lib = _library()
    tok = lib.Tokenizer(lib.models.BPE())
    tok.pre_tokenizer = lib.pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = lib.decoders.ByteLevel()
    trainer = lib.trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=list(SPECIAL_TOKENS),
                                      min_frequency=min_frequency, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = lib.processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return cls(tok.to_str(pretty=True), where="trained hrom tokenizer")

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> List[int]:
    return self._tok.encode(text).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(base._check_ids(ids, self.vocab_size, self.kind))

  def token_id(self, token: str) -> Optional[int]:
    """The id of one whole token (e.g. a role marker), without the `</s>` that encode appends."""
    return self._tok.token_to_id(token)

  def file_bytes(self) -> bytes:
    """The hrom_tokenizer.json the original reads."""
    return self.file_text.encode("utf-8")

  def _config(self, directory):
    return {"hf_tokenizer": self.file_text}

  @classmethod
  def _from_config(cls, config, directory):
    return cls(config["hf_tokenizer"], where=os.path.join(directory, base.TOKENIZER_FILE))


def chat_example(tokenizer: HromTokenizer, utterances: Sequence[str], max_turns: int = 6,
                 max_seq_len: int = 1024):
  """(input_ids, labels) of one dialogue as the original ChatDataset makes them: per turn the role id, encode(utt)
  (which already ends in </s>) and another </s>; head kept to max_seq_len - 2, then <s> ... </s>; shifted by one."""
  user, assistant, bos, eos = (tokenizer.token_id(t) for t in ("<user>", "<assistant>", "<s>", "</s>"))
  ids: List[int] = []
  for i, utt in enumerate(utterances[:max_turns]):
    ids += [user if i % 2 == 0 else assistant] + tokenizer.encode(utt) + [eos]
  seq = [bos] + ids[:max_seq_len - 2] + [eos]
  return seq[:-1], seq[1:]


# A turn of jaxlm's `dialogue` format: "<user> text</s>" or "<assistant> text</s>".
_TURN = re.compile(r"(<user>|<assistant>) (.*?)</s>", re.S)


def training_strings(text: str) -> List[str]:
  """What a trained tokenizer learns from: the original's one "<role> utterance" string per dialogue turn when
  the corpus is in jaxlm's dialogue format, else the corpus's non-empty lines."""
  turns = [f"{role} {utt}" for role, utt in _TURN.findall(text)]
  return turns or [line for line in text.splitlines() if line.strip()]


def from_data_config(data_cfg, train_text_fn, work_dir) -> HromTokenizer:
  """data.tokenizer='hrom_bpe': data.tokenizer_path names an hrom_tokenizer.json to use, or is empty/'train' to
  train one on the corpus with data.vocab_size (default the original's 32000)."""
  path = base._cfg(data_cfg, "tokenizer_path") or "train"
  if path != "train":
    if not os.path.isfile(path):
      raise FileNotFoundError(f"data.tokenizer_path={path!r}: no such HROM tokenizer file")
    return HromTokenizer.from_file(path)
  return HromTokenizer.train(training_strings(train_text_fn()), int(base._cfg(data_cfg, "vocab_size") or 32000))


base._FACTORIES[KIND] = from_data_config
