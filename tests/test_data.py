"""Tests for jaxlm.data: tokenizers, corpora, Grain pipelines (CPU, offline)."""
import json
import os

import numpy as np
import pytest

from jaxlm.data import build_data, default_data_config, load_tokenizer, make_tokenizer
from jaxlm.data import pipeline, sources, tokenizers
from jaxlm.data.tokenizers import CharTokenizer, GPT2Tokenizer, IdsTokenizer, SentencePieceTokenizer


def _ids_corpus(tmp_path, n, name="ids.txt"):
  """A corpus whose token i is i, so every window can be checked against its start offset."""
  path = tmp_path / name
  path.write_text(" ".join(str(i) for i in range(n)))
  return str(path)


def _ids_cfg(path, n, **extra):
  return {"corpus": path, "tokenizer": "ids", "vocab_size": n, **extra}


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# ---------------------------------------------------------------- tokenizers

def test_char_round_trip_and_save_load(tmp_path):
  text = "hello, world!\nbye"
  tok = CharTokenizer.train(text)
  assert tok.chars == sorted(set(text))
  assert tok.vocab_size == len(set(text))
  assert tok.encode("\n") == [0]  # '\n' sorts first
  assert tok.decode(tok.encode(text)) == text
  tok.save(str(tmp_path))
  loaded = load_tokenizer(str(tmp_path))
  assert isinstance(loaded, CharTokenizer)
  assert loaded.chars == tok.chars and loaded.encode(text) == tok.encode(text)


def test_char_unknown_character_is_named():
  tok = CharTokenizer.train("abc")
  with pytest.raises(ValueError, match="'z'"):
    tok.encode("abz")
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([3])


def test_gpt2_known_ids_and_round_trip(tmp_path):
  tok = GPT2Tokenizer()
  assert tok.encode("Hello world") == [15496, 995]
  assert tok.encode(" the") == [262]
  assert tok.vocab_size == 50257 and tok.eos_id == 50256 and tok.pad_id is None
  text = "It's 2024: naïve café — 'quotes' and\n\nnew lines."
  assert tok.decode(tok.encode(text)) == text
  # encode_ordinary: special-token text in data stays ordinary text.
  assert 50256 not in tok.encode("<|endoftext|>")
  tok.save(str(tmp_path))
  assert load_tokenizer(str(tmp_path)).encode(text) == tok.encode(text)


def test_t5_sentencepiece_known_ids_and_sentinels(tmp_path):
  tok = SentencePieceTokenizer()
  assert tok.encode("Hello world") == [8774, 296]
  assert tok.decode([8774, 296]) == "Hello world"
  assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id) == (32000, 0, 1, None)
  t5 = SentencePieceTokenizer(extra_ids=100)
  assert t5.vocab_size == 32100
  assert t5.decode([8774, 32099, 296]) == "Hello<extra_id_0> world"
  assert t5.decode([32098, 8774]) == "<extra_id_1> Hello"
  t5.save(str(tmp_path))
  assert (tmp_path / "spiece.model").is_file()
  loaded = load_tokenizer(str(tmp_path))
  assert loaded.vocab_size == 32100 and loaded.encode("Hello world") == [8774, 296]


def test_sentencepiece_training_then_load(tmp_path):
  text = sources.load_text("tinyshakespeare")[:60000]
  tok = SentencePieceTokenizer.train([text], vocab_size=300, model_prefix_dir=str(tmp_path / "sp"))
  assert tok.vocab_size == 300
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, None)
  sample = "First Citizen:\nWe are accounted poor citizens"
  ids = tok.encode(sample)
  assert 0 < len(ids) < len(sample) and max(ids) < 300
  assert tok.decode(ids) == sample.replace("\n", " ")  # sentencepiece normalises whitespace
  tok.save(str(tmp_path / "saved"))
  loaded = load_tokenizer(str(tmp_path / "saved"))
  assert loaded.encode(sample) == ids
  # Training from a file path gives the same kind of model.
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(text)
  from_file = SentencePieceTokenizer.train(str(corpus), vocab_size=300, model_prefix_dir=str(tmp_path / "sp2"))
  assert from_file.encode(sample) == ids


def test_sentencepiece_trained_from_config_keeps_dialogue_markers(tmp_path):
  cfg = {"corpus": "dailydialog_sample", "format": "dialogue", "tokenizer": "sentencepiece",
         "tokenizer_path": "train:bpe", "vocab_size": 2000, "packing": "documents"}
  run = str(tmp_path / "run")
  bundle = build_data(cfg, seq_len=64, batch_size=2, seed=0, tokenizer_dir=run)
  tok = bundle.tokenizer
  assert tok.vocab_size <= 2000 == bundle.vocab_size and os.path.isfile(os.path.join(run, "spiece.model"))
  for marker in sources.DIALOGUE_MARKERS:
    assert len(tok.encode(marker)) <= 2  # the marker, maybe after a word-start piece
    assert marker in [tok.decode([i]) for i in tok.encode(marker)]
  text = "<s><user> Hello !</s><assistant> Hi .</s>"
  assert tok.decode(tok.encode(text)) == text
  resumed = build_data(cfg, seq_len=64, batch_size=2, seed=0, tokenizer_dir=run)
  assert resumed.tokenizer.encode(text) == tok.encode(text)
  with pytest.raises(ValueError, match="train:wordpiece"):
    make_tokenizer({**cfg, "tokenizer_path": "train:wordpiece"}, lambda: text)


def test_ids_tokenizer(tmp_path):
  tok = IdsTokenizer(10, eos_id=9)
  assert tok.encode("1, 2 3\n4") == [1, 2, 3, 4]
  assert tok.decode([1, 2]) == "1 2"
  with pytest.raises(ValueError, match="id 10"):
    tok.encode("10")
  with pytest.raises(ValueError, match="'x'"):
    tok.encode("1 x")
  tok.save(str(tmp_path))
  loaded = load_tokenizer(str(tmp_path))
  assert (loaded.vocab_size, loaded.eos_id) == (10, 9)


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    load_tokenizer(str(tmp_path / "nowhere"))
  (tmp_path / "tokenizer.json").write_text(json.dumps({"kind": "wordpiece"}))
  with pytest.raises(ValueError, match="wordpiece"):
    load_tokenizer(str(tmp_path))


def test_make_tokenizer_factory():
  assert isinstance(make_tokenizer({"tokenizer": "char"}, lambda: "ba"), CharTokenizer)
  assert make_tokenizer({"tokenizer": "char"}, lambda: "ba").encode("ab") == [0, 1]
  assert make_tokenizer({"tokenizer": "gpt2"}, None).encode("Hello world") == [15496, 995]
  assert make_tokenizer({"tokenizer": "sentencepiece", "vocab_size": 32100}, None).vocab_size == 32100
  assert make_tokenizer({"tokenizer": "ids", "vocab_size": 7}, None).vocab_size == 7
  with pytest.raises(ValueError, match="data.vocab_size"):
    make_tokenizer({"tokenizer": "ids", "vocab_size": 0}, None)
  with pytest.raises(ValueError, match="bytes"):
    make_tokenizer({"tokenizer": "bytes"}, None)


# ---------------------------------------------------------------- sources

def test_gutenberg_header_and_footer_stripped():
  alice = sources.load_text("alice")
  assert alice.startswith("ALICE’S ADVENTURES IN WONDERLAND")
  assert alice.rstrip().endswith("THE END")
  assert "Gutenberg" not in alice and "\r" not in alice and "\ufeff" not in alice
  both = sources.load_text("alice+looking_glass")
  assert both.startswith(alice) and "THROUGH THE LOOKING-GLASS" in both


def test_jsonl_and_dailydialog(tmp_path):
  c4 = sources.load_documents("c4_sample")
  assert len(c4) == 300 and all(isinstance(d, str) and d for d in c4)
  dialogues = sources.load_documents("dailydialog_sample")
  assert len(dialogues) == 200
  assert dialogues[0] == "The kitchen stinks .\nI'll throw out the garbage ."
  custom = tmp_path / "qa.jsonl"
  custom.write_text('{"body": "one"}\n\n{"body": "two"}\n')
  assert sources.load_documents(str(custom), text_field="body") == ["one", "two"]
  with pytest.raises(ValueError, match=r"qa.jsonl:1: .*'text'"):
    sources.load_documents(str(custom))


def test_dolly_and_dialogue_formats():
  dolly = sources.load_documents("dolly_sample", format="dolly")
  assert len(dolly) == 24
  assert all(d.startswith("Instruction: ") and "\nResponse: " in d for d in dolly)
  with_context = [d for d in dolly if "\nContext: " in d]
  assert 0 < len(with_context) < len(dolly)  # empty contexts are left out, as Optimus Prime does
  dialogues = sources.load_documents("dailydialog_sample", format="dialogue")
  assert dialogues[0] == "<s><user> The kitchen stinks .</s><assistant> I'll throw out the garbage .</s>"
  assert max(d.count("</s>") for d in dialogues) == sources.DIALOGUE_MAX_TURNS  # longer dialogues are cut
  with pytest.raises(ValueError, match=r"alice.txt:1: format 'dialogue'"):
    sources.load_documents("alice", format="dialogue")
  with pytest.raises(ValueError, match=r"c4_sample.jsonl:1: .*'instruction'"):
    sources.load_documents("c4_sample", format="dolly")
  with pytest.raises(ValueError, match="data.format 'chat'"):
    sources.load_documents("alice", format="chat")


def test_missing_and_empty_files_are_named(tmp_path):
  missing = str(tmp_path / "missing.txt")
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    sources.load_text(missing)
  empty = tmp_path / "empty.txt"
  empty.write_text("  \n")
  with pytest.raises(ValueError, match="empty.txt"):
    sources.load_text(str(empty))
  empty_jsonl = tmp_path / "empty.jsonl"
  empty_jsonl.write_text("")
  with pytest.raises(ValueError, match="empty.jsonl"):
    build_data({"corpus": str(empty_jsonl)}, seq_len=8, batch_size=2, seed=0)


# ---------------------------------------------------------------- pipeline

def test_split_is_deterministic_and_disjoint():
  tokens = np.arange(1000, dtype=np.int32)
  train, val = pipeline.split_tokens(tokens, 0.1)
  assert len(train) == 900 and len(val) == 100
  assert not set(train.tolist()) & set(val.tolist())
  np.testing.assert_array_equal(np.concatenate([train, val]), tokens)
  train2, val2 = pipeline.split_tokens(tokens, 0.1)
  np.testing.assert_array_equal(train, train2)
  np.testing.assert_array_equal(val, val2)
  with pytest.raises(ValueError, match="val_fraction"):
    pipeline.split_tokens(tokens, 1.0)


def test_nanogpt_char_shakespeare_split_sizes():
  bundle = build_data({}, seq_len=32, batch_size=2, seed=0)
  assert bundle.tokenizer.vocab_size == 65 == bundle.vocab_size
  assert (bundle.train_tokens, bundle.val_tokens) == (1003854, 111540)  # nanoGPT's shakespeare_char numbers


def test_train_windows_are_shifted_slices_of_the_train_split(tmp_path):
  n, seq_len = 500, 16
  bundle = build_data(_ids_cfg(_ids_corpus(tmp_path, n), n), seq_len=seq_len, batch_size=8, seed=1)
  assert (bundle.train_tokens, bundle.val_tokens) == (450, 50)
  for batch in _take(bundle.train_iter, 5):
    assert batch["inputs"].dtype == np.int32 and batch["targets"].dtype == np.int32
    assert batch["weights"].dtype == np.float32 and batch["inputs"].shape == (8, seq_len)
    np.testing.assert_array_equal(batch["weights"], 1.0)
    starts = batch["inputs"][:, :1]
    np.testing.assert_array_equal(batch["inputs"], starts + np.arange(seq_len))
    np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)
    assert batch["targets"].max() < bundle.train_tokens  # never reads validation tokens


def test_one_epoch_visits_every_window_once(tmp_path):
  n, seq_len = 60, 8
  tokens = np.arange(n, dtype=np.int32)
  n_windows = n - seq_len  # starts 0 .. n - seq_len - 1
  ds = pipeline.train_dataset(tokens, seq_len=seq_len, batch_size=1, seed=3)
  epoch1 = [int(ds[i]["inputs"][0, 0]) for i in range(n_windows)]
  epoch2 = [int(ds[i]["inputs"][0, 0]) for i in range(n_windows, 2 * n_windows)]
  assert sorted(epoch1) == sorted(epoch2) == list(range(n_windows))
  assert epoch1 != epoch2  # reshuffled each epoch
  assert epoch1 != list(range(n_windows))


def test_same_seed_same_batches_different_seed_different(tmp_path):
  path, n = _ids_corpus(tmp_path, 400), 400
  make = lambda seed: build_data(_ids_cfg(path, n), seq_len=8, batch_size=4, seed=seed).train_iter
  a, b, c = _take(make(0), 4), _take(make(0), 4), _take(make(1), 4)
  _assert_batches_equal(a, b)
  assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_iterator_state_save_and_restore(tmp_path):
  path, n = _ids_corpus(tmp_path, 300), 300
  make = lambda: build_data(_ids_cfg(path, n), seq_len=8, batch_size=4, seed=5).train_iter
  it = make()
  _take(it, 7)
  state = it.get_state()
  json.dumps(state)  # checkpoints store it as JSON
  expected = _take(it, 5)
  fresh = make()
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 5), expected)


def test_orbax_checkpoint_of_the_iterator(tmp_path):
  import grain
  import orbax.checkpoint as ocp
  path, n = _ids_corpus(tmp_path, 300), 300
  make = lambda: build_data(_ids_cfg(path, n), seq_len=8, batch_size=4, seed=5).train_iter
  it = make()
  _take(it, 3)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave({"step": np.asarray(3, np.int32)}),
                                         data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = _take(it, 3)
    fresh = make()
    restored = mngr.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore({"step": np.asarray(0, np.int32)}),
                                                       data=grain.checkpoint.CheckpointRestore(fresh)))
  assert int(restored["state"]["step"]) == 3
  _assert_batches_equal(_take(restored["data"], 3), expected)


def test_eval_batches_are_ordered_non_overlapping_and_padded(tmp_path):
  n, seq_len = 1000, 10
  cfg = _ids_cfg(_ids_corpus(tmp_path, n), n, val_fraction=0.2)
  bundle = build_data(cfg, seq_len=seq_len, batch_size=4, seed=0)
  batches = bundle.eval_batches()
  # 200 val tokens (800..999) -> windows start at 800, 810, ..., 980: 19 windows -> 5 batches, last has 3 rows.
  assert len(batches) == 5
  starts = np.concatenate([b["inputs"][:, 0] for b in batches])
  np.testing.assert_array_equal(starts[:19], 800 + seq_len * np.arange(19))
  np.testing.assert_array_equal(batches[-1]["weights"].sum(axis=1), [seq_len] * 3 + [0])
  for b in batches:
    np.testing.assert_array_equal(b["targets"][b["weights"] > 0], (b["inputs"] + 1)[b["weights"] > 0])
  _assert_batches_equal(bundle.eval_batches(), batches)
  capped = build_data({**cfg, "eval_batches": 2}, seq_len=seq_len, batch_size=4, seed=0).eval_batches()
  _assert_batches_equal(capped, batches[:2])


def test_short_validation_split_error_names_corpus(tmp_path):
  path = _ids_corpus(tmp_path, 200, name="tiny.txt")
  with pytest.raises(ValueError, match=r"validation split of corpus '.*tiny\.txt' has 20 tokens.*seq_len \+ 1 = 33"):
    build_data(_ids_cfg(path, 200), seq_len=32, batch_size=2, seed=0)


def test_document_packing_joins_with_eos_and_uses_stride_seq_len():
  seq_len = 32
  bundle = build_data({"corpus": "dailydialog_sample", "tokenizer": "gpt2", "packing": "documents"},
                      seq_len=seq_len, batch_size=4, seed=0)
  tok = bundle.tokenizer
  docs = sources.load_documents("dailydialog_sample")
  stream = pipeline.pack_documents(docs[:2], tok)
  first = tok.encode(docs[0])
  assert stream[len(first)] == tok.eos_id and stream.tolist()[:len(first)] == first
  assert bundle.train_tokens + bundle.val_tokens == len(pipeline.pack_documents(docs, tok))
  full = pipeline.pack_documents(docs, tok)
  for batch in _take(bundle.train_iter, 3):
    for row in batch["inputs"]:
      # find the row in the packed stream: its start must be a multiple of seq_len
      matches = [s for s in range(0, bundle.train_tokens - seq_len, seq_len) if np.array_equal(full[s:s + seq_len], row)]
      assert matches, "window does not start at a multiple of seq_len"


def test_resume_reuses_the_saved_tokenizer(tmp_path):
  tok_dir = str(tmp_path / "run")
  first = build_data({"corpus": "alice"}, seq_len=16, batch_size=2, seed=0, tokenizer_dir=tok_dir)
  assert os.path.isfile(os.path.join(tok_dir, "tokenizer.json"))
  # A corpus with fewer characters would train a smaller vocabulary; the saved one must win.
  small = tmp_path / "small.txt"
  small.write_text("alice " * 200)
  again = build_data({"corpus": str(small)}, seq_len=16, batch_size=2, seed=0, tokenizer_dir=tok_dir)
  assert again.tokenizer.chars == first.tokenizer.chars
  with pytest.raises(ValueError, match="'char' tokenizer but data.tokenizer is 'gpt2'"):
    build_data({"corpus": "alice", "tokenizer": "gpt2"}, seq_len=16, batch_size=2, seed=0, tokenizer_dir=tok_dir)


def test_config_defaults_and_validation():
  cfg = default_data_config()
  assert cfg.corpus == "tinyshakespeare" and cfg.tokenizer == "char" and cfg.val_fraction == 0.1
  assert cfg.packing == "windows" and cfg.vocab_size == 0 and cfg.eval_batches == 0
  with pytest.raises(ValueError, match="corpuss"):
    build_data({"corpuss": "alice"}, seq_len=8, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="packing"):
    build_data({"packing": "bins"}, seq_len=8, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="data.vocab_size=10"):
    build_data({"corpus": "alice", "vocab_size": 10}, seq_len=8, batch_size=2, seed=0)
  padded = build_data({"corpus": "alice", "tokenizer": "gpt2", "vocab_size": 50304}, seq_len=8, batch_size=2, seed=0)
  assert padded.vocab_size == 50304 and padded.tokenizer.vocab_size == 50257
