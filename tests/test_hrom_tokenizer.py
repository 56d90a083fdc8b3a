"""HROM's Hugging Face ByteLevel BPE: the original's ids and text, read and written by convert, trained like the original.

Fixture tests/fixtures/hrom/tokenizer/ (from shared/reference/hrom/tokenizer/): the original TokenizerTrainer's file
for the shipped DailyDialog sample and the original objects' outputs (encode/decode of five strings, ChatDataset rows
of the first five dialogues).
"""
import json
import os
import shutil

import pytest

from convert import api
from convert.errors import ConversionError
from jaxlm import chat, modeldir
from jaxlm.data import hrom_tokenizer, sources, tokenizers
from small_models import random_params

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hrom")
TOKENIZER_FILE = os.path.join(FIXTURES, "tokenizer", "hrom_tokenizer.json")
with open(os.path.join(FIXTURES, "tokenizer", "tokenizer_cases.json"), encoding="utf-8") as _f:
  CASES = json.load(_f)
with open(TOKENIZER_FILE, "rb") as _f:
  FILE_BYTES = _f.read()
HROM_MODEL = dict(arch="decoder", family="hrom", vocab_size=CASES["vocab_size"], d_model=16, n_layers=1, n_heads=2,
                  d_ff=32, norm="layer", norm_eps=1e-5, rope_style="half", rope_theta=1e4, glu="sigmoid",
                  attn_bias=True, mlp_bias=True, head_bias=True, tie_embeddings=False, causal=True, max_seq_len=64)


@pytest.fixture(scope="module")
def tok():
  return hrom_tokenizer.HromTokenizer.from_file(TOKENIZER_FILE)


def assert_original_outputs(tok):
  for case in CASES["encode"]:
    assert tok.encode(case["text"]) == case["ids"], case["text"]
    assert tok.decode(case["ids"]) == case["decoded"], case["text"]


def test_encode_decode_match_the_original(tok):
  assert_original_outputs(tok)
  assert tok.encode("Hello")[-1] == 2 and tok.decode(tok.encode("Hello")) == " Hello"  # </s> appended, space led
  assert {t: tok.token_id(t) for t in CASES["special_ids"]} == CASES["special_ids"]
  assert tok.vocab_size == CASES["vocab_size"]


def test_chat_dataset_rows_match_the_original(tok):
  with open(os.path.join(sources.resolve("dailydialog_sample")[0]), encoding="utf-8") as f:
    lines = f.read().splitlines()
  for line, row in zip(lines, CASES["chat_dataset_rows"], strict=False):
    utterances = [u.strip() for u in line.split("__eou__") if u.strip()]
    assert hrom_tokenizer.chat_example(tok, utterances) == (row["input_ids"], row["labels"])


def test_full_config_trains_the_original_file_byte_for_byte():
  """configs/hrom.py's data section trains, on the same sample, the file the original trainer wrote."""
  from configs import hrom
  data = hrom.get_config().data
  text = sources.DOC_SEPARATOR.join(sources.load_documents(data.corpus, data.text_field, data.format))
  trained = tokenizers.make_tokenizer(data, lambda: text)
  assert trained.kind == "hrom_bpe" and trained.file_bytes() == FILE_BYTES


def test_saved_tokenizer_keeps_the_file_bytes(tok, tmp_path):
  tok.save(str(tmp_path))
  loaded = tokenizers.load_tokenizer(str(tmp_path))
  assert loaded.file_bytes() == FILE_BYTES
  assert_original_outputs(loaded)


def test_bad_file_is_named(tmp_path):
  bad = tmp_path / "hrom_tokenizer.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="hrom_tokenizer.json: not a Hugging Face tokenizers file"):
    hrom_tokenizer.HromTokenizer.from_file(str(bad))


def test_convert_round_trip_writes_and_reads_the_file(tok, tmp_path):
  """A jaxlm HROM model with this tokenizer -> original layout (checkpoints/ + tokenizer/) -> model directory -> back:
  the tokenizer file is byte-equal at every step and the imported model directory encodes like the original."""
  model_dir = modeldir.save_model_dir(str(tmp_path / "trained"), HROM_MODEL, random_params(HROM_MODEL),
                                      {"kind": tok.kind, **tok._config("")}, {})
  exported = api.jax2torch(model_dir, str(tmp_path / "run" / "checkpoints") + os.sep)
  assert os.path.dirname(exported) == str(tmp_path / "run" / "checkpoints")
  assert (tmp_path / "run" / "tokenizer" / "hrom_tokenizer.json").read_bytes() == FILE_BYTES

  imported = api.torch2jax(exported, str(tmp_path / "imported"))  # found beside checkpoints/, no flag
  assert_original_outputs(tokenizers.load_tokenizer(imported))
  assert modeldir.read_config(imported)["tokenizer"]["kind"] == "hrom_bpe"

  again = api.jax2torch(imported, str(tmp_path / "run2" / "checkpoints") + os.sep)
  assert (tmp_path / "run2" / "tokenizer" / "hrom_tokenizer.json").read_bytes() == FILE_BYTES
  # A second export beside an identical tokenizer file needs no --overwrite.
  api.jax2torch(imported, os.path.join(os.path.dirname(again), "second.pt"))


def test_tokenizer_flag_and_mismatch(tmp_path):
  """The reference checkpoint has 256 ids: the 1,863-id tokenizer is refused, naming both; without one it stays ids."""
  src = os.path.join(FIXTURES, "hrom_20261125_133958_step0.pt")
  with pytest.raises(ConversionError, match=r"hrom_tokenizer.json: the tokenizer has 1863 ids .* only 256"):
    api.torch2jax(src, str(tmp_path / "a"), tokenizer=TOKENIZER_FILE)
  with pytest.raises(ConversionError, match="--tokenizer .*nowhere.json: no such file"):
    api.torch2jax(src, str(tmp_path / "b"), tokenizer=str(tmp_path / "nowhere.json"))
  plain = api.torch2jax(src, str(tmp_path / "c"))
  assert modeldir.read_config(plain)["tokenizer"]["kind"] == "ids"


def test_chat_prompt_uses_single_marker_ids(tok):
  """Role markers are their own ids (encode would append </s>); a message ends in encode's </s> plus the turn's
  </s>, as the original's training rows do."""
  fmt = chat.DialogueFormat(tok)
  message = fmt.encode_message("Hello, how are you today?", True)
  assert fmt.prompt([], message, 100) == [1, 4] + CASES["encode"][0]["ids"] + [2, 5]
  assert 2 in fmt.stop_ids
