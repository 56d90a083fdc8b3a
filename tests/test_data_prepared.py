"""Prepared datasets (jaxlm.data.prepared / loader / catalog): tiny generated corpora and the shipped samples,
CPU, offline, a few seconds in all."""
import gzip
import json
import os
import time

import numpy as np
import pytest

from jaxlm.data import catalog, loader, pipeline, prepared, sources, store, tokenize_pool, tokenizers


def _cfg(tmp_path, corpus, **extra):
  return {"corpus": str(corpus), "text_field": "text", "format": "text", "tokenizer": "char", "tokenizer_path": "",
          "vocab_size": 0, "cache_dir": str(tmp_path / "cache"), **extra}


def _write_jsonl_gz(path, texts):
  with gzip.open(path, "wt", encoding="utf-8") as f:
    for text in texts:
      f.write(json.dumps({"text": text, "url": "http://x"}) + "\n")
  return str(path)


def _docs(n, seed=0):
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "gamma", "delta", "eps"]
  return [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(n)]


def _stream(root):
  st = store.TokenStore(root)
  tokens, loss, docs = st.read(0, st.n_tokens)
  return st, tokens, loss, docs


# ---------------------------------------------------------------- preparing

def test_prepared_jsonl_gz_is_a_tfds_dataset_holding_every_document_then_its_separator(tmp_path):
  import tensorflow_datasets as tfds
  texts = _docs(300) + ["x" * 5000]  # one long document spans several records
  corpus = _write_jsonl_gz(tmp_path / "c4-train.00000-of-01024.json.gz", texts)
  root = prepared.prepare(_cfg(tmp_path, corpus), progress=False)
  tok = prepared.load_tokenizer(root)
  expected = np.concatenate([tok.encode(t) + tok.encode(sources.DOC_SEPARATOR) for t in texts])
  st, tokens, loss, docs = _stream(root)
  np.testing.assert_array_equal(tokens, expected)
  assert loss is None and st.n_docs == len(texts) and docs[-1] == len(texts) - 1
  meta = json.load(open(os.path.join(root, store.META_FILE)))
  assert (meta["tokens"], meta["documents"]) == (len(expected), len(texts))
  assert meta["sources"][0]["sha256"] and meta["sources"][0]["bytes"] == os.path.getsize(corpus)
  # An ordinary TFDS dataset: TFDS alone loads it, records in stream order.
  builder = tfds.builder_from_directory(store.tfds_dir(root))
  records = builder.as_data_source(split="train")
  assert len(records) == st.n_records > len(texts)
  np.testing.assert_array_equal(np.concatenate([records[i]["tokens"] for i in range(len(records))]), expected)
  assert max(len(records[i]["tokens"]) for i in range(len(records))) <= meta["record_tokens"]


def test_prepared_dataset_is_found_again_and_never_retokenized(tmp_path, monkeypatch):
  cfg = _cfg(tmp_path, sources.SHIPPED["alice"])
  root = prepared.ensure(cfg, progress=False)
  monkeypatch.setattr(tokenize_pool, "tokenize", lambda *a, **k: pytest.fail("tokenized again"))
  assert prepared.ensure(dict(cfg), progress=False) == root
  assert prepared.find({**cfg, "tokenizer": "gpt2"}) is None  # another tokenizer is another dataset


def test_interrupted_preparation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
  corpus = _write_jsonl_gz(tmp_path / "docs.jsonl.gz", _docs(50))
  cfg = _cfg(tmp_path, corpus)
  real = tokenize_pool._encode_all
  calls = []

  def failing(texts, tokenizer=None):
    calls.append(1)
    if len(calls) == 1:
      raise KeyboardInterrupt
    return real(texts, tokenizer)
  monkeypatch.setattr(tokenize_pool, "_encode_all", failing)
  with pytest.raises(KeyboardInterrupt):
    prepared.prepare(cfg, progress=False)
  assert prepared.find(cfg) is None
  assert os.listdir(tmp_path / "cache") == []  # the partial directory is gone too
  root = prepared.ensure(cfg, progress=False)  # rerunning finishes the job
  assert store.TokenStore(root).n_docs == 50


def test_worker_processes_give_the_same_tokens_as_one_process(tmp_path):
  corpus = _write_jsonl_gz(tmp_path / "docs.jsonl.gz", _docs(400, seed=1))
  one = prepared.prepare(_cfg(tmp_path / "a", corpus, tokenizer="gpt2"), progress=False, workers=0)
  two = prepared.prepare(_cfg(tmp_path / "b", corpus, tokenizer="gpt2"), progress=False, workers=2)
  np.testing.assert_array_equal(_stream(one)[1], _stream(two)[1])


def test_big_text_file_streams_in_chunks_with_the_same_char_tokens(tmp_path, monkeypatch):
  text = "".join(f"line {i} of a long book\n" for i in range(3000))
  path = tmp_path / "book.txt"
  path.write_text(text)
  monkeypatch.setattr(sources, "STREAM_TXT_BYTES", 1000)
  monkeypatch.setattr(sources, "_CHUNK_CHARS", 777)
  docs = list(sources.iter_documents(str(path)))
  assert len(docs) == 1 and isinstance(docs[0], sources.TextChunks)
  root = prepared.prepare(_cfg(tmp_path, path), progress=False)
  tok = prepared.load_tokenizer(root)
  assert tok.decode(_stream(root)[1]) == text + sources.DOC_SEPARATOR


# ---------------------------------------------------------------- the seeds' formats on the shipped samples

def test_c4_sample_min_chars_drops_short_texts(tmp_path):
  texts = [json.loads(line)["text"] for line in open(sources.SHIPPED["c4_sample"], encoding="utf-8")]
  kept = [t for t in texts if len(t) >= 101]
  assert 0 < len(kept) < len(texts)  # the sample has texts on both sides of HRM-Text1's cut
  root = prepared.prepare(_cfg(tmp_path, "c4_sample", tokenizer="sentencepiece", min_chars=101), progress=False)
  st = store.TokenStore(root)
  assert st.n_docs == len(kept)
  tok = prepared.load_tokenizer(root)
  first = st.read(*st.doc_range(0))[0]
  assert first[-1] == tok.eos_id and tok.decode(first[:-1]) == tok.decode(tok.encode(kept[0]))


def test_decoded_records_are_kept_within_their_budget_and_reads_do_not_change(tmp_path, monkeypatch):
  """Reads through the record cache equal TFDS's records (with loss masks too); a record is decoded once while
  the cache holds it; the cache never holds more records than RECORD_CACHE_BYTES allows; a pickled store (Grain
  worker processes) reads the same without the cache's contents."""
  import pickle
  import tensorflow_datasets as tfds
  cfg = _cfg(tmp_path, "dolly_sample", format="dolly", loss_on="response")
  root = prepared.prepare(cfg, progress=False)
  records = tfds.builder_from_directory(store.tfds_dir(root)).as_data_source(split="train")
  expected_tokens = np.concatenate([records[i]["tokens"] for i in range(len(records))])
  expected_loss = np.concatenate([records[i]["loss"] for i in range(len(records))])
  st = store.TokenStore(root)
  assert st.with_loss and st.n_records > 4
  rng = np.random.default_rng(0)
  spans = [(int(a), int(a) + int(n)) for a, n in zip(rng.integers(0, st.n_tokens - 300, 50), rng.integers(1, 300, 50))]
  for _ in range(2):
    for a, b in spans:
      tokens, loss, _ = st.read(a, b)
      np.testing.assert_array_equal(tokens, expected_tokens[a:b])
      np.testing.assert_array_equal(loss, expected_loss[a:b])
  info = st._record.cache_info()
  assert info.misses <= st.n_records and info.hits > info.misses  # the second pass decodes nothing
  copy = pickle.loads(pickle.dumps(st))
  assert copy._record.cache_info().currsize == 0
  np.testing.assert_array_equal(copy.read(*spans[0])[0], expected_tokens[slice(*spans[0])])
  monkeypatch.setattr(store, "RECORD_CACHE_BYTES", 3 * (st.n_tokens // st.n_records) * 5)
  small = store.TokenStore(root)
  for a, b in spans:
    np.testing.assert_array_equal(small.read(a, b)[0], expected_tokens[a:b])
    assert small._record.cache_info().currsize <= 3


def test_a_batch_of_windows_reads_what_each_window_reads(tmp_path):
  """TokenStore.windows (the training batches' read) equals read() window by window: tokens and loss masks,
  windows inside one record and windows crossing one or more record boundaries; out of range is an IndexError."""
  root = prepared.prepare(_cfg(tmp_path, "dolly_sample", format="dolly", loss_on="response"), progress=False)
  st = store.TokenStore(root)
  length = 300  # longer than some records: a few windows span three
  inner = np.random.default_rng(1).integers(0, st.n_tokens - length, 40)
  boundaries = np.asarray(st.record_starts[1:-1])
  # Ending exactly at a record's end, one token past it, and starting just before it.
  crossing = np.concatenate([boundaries - length, boundaries - length + 1, boundaries - 5])
  starts = np.concatenate([inner, crossing[(crossing >= 0) & (crossing + length <= st.n_tokens)], [0, st.n_tokens - length]])
  tokens, loss = st.windows(starts, length)
  assert tokens.shape == loss.shape == (len(starts), length) and tokens.dtype == np.int32
  for row, start in enumerate(starts.tolist()):
    want_tokens, want_loss, _ = st.read(start, start + length)
    np.testing.assert_array_equal(tokens[row], want_tokens)
    np.testing.assert_array_equal(loss[row], want_loss)
  with pytest.raises(IndexError, match="outside the stream"):
    st.windows([st.n_tokens - length + 1], length)


def test_dailydialog_assistant_only_loss_and_padded_rows(tmp_path):
  cfg = _cfg(tmp_path, "dailydialog_sample", format="dialogue", tokenizer="gpt2", loss_on="response",
             packing="padded", val_fraction=0.1)
  root = prepared.prepare(cfg, progress=False)
  tok = prepared.load_tokenizer(root)
  data = pipeline.build_prepared_data(root, cfg, seq_len=64, batch_size=4, seed=0, tokenizer=tok)
  batch = next(data.train_iter)
  assert set(batch) == {"inputs", "targets", "weights", "padding_mask"}
  for inputs, targets, weights, mask in zip(batch["inputs"], batch["targets"], batch["weights"], batch["padding_mask"]):
    text = tok.decode(inputs[mask])
    assert text.startswith("<s><user>") and text.count("<user>") <= 3
    trained = tok.decode(targets[weights > 0])  # only assistant turns (and the final separator) carry weight
    assert "<user>" not in trained and trained
    assert (weights[~mask] == 0).all()
  st = store.TokenStore(root)
  # Cut to 6 turns; the sample's first dialogue has 2.
  assert tok.decode(st.read(*st.doc_range(0))[0]).count("</s>") == 2
  assert max(tok.decode(st.read(*st.doc_range(d))[0]).count("</s>") for d in range(st.n_docs)) == 6


def test_dolly_template_and_response_loss(tmp_path):
  cfg = _cfg(tmp_path, "dolly_sample", format="dolly", loss_on="response")
  root = prepared.prepare(cfg, progress=False)
  tok = prepared.load_tokenizer(root)
  st = store.TokenStore(root)
  tokens, loss, _ = st.read(*st.doc_range(0))
  record = json.loads(open(sources.SHIPPED["dolly_sample"], encoding="utf-8").readline())
  assert tok.decode(tokens) == f"Instruction: {record['instruction']}\nResponse: {record['response']}\n\n"
  assert tok.decode(tokens[loss == 1]) == record["response"] + "\n\n"


# ---------------------------------------------------------------- reading

def test_documents_packing_gives_segment_ids_and_no_loss_across_documents(tmp_path):
  corpus = _write_jsonl_gz(tmp_path / "d.jsonl.gz", _docs(200, seed=3))
  cfg = _cfg(tmp_path, corpus, packing="documents", val_fraction=0.1)
  root = prepared.prepare(cfg, progress=False)
  tok = prepared.load_tokenizer(root)
  data = pipeline.build_prepared_data(root, cfg, seq_len=32, batch_size=8, seed=0, tokenizer=tok)
  batch = next(data.train_iter)
  seg, w = batch["segment_ids"], batch["weights"]
  assert seg.min() >= 1 and (np.diff(seg, axis=1) >= 0).all() and seg.max() > 1
  # Where the next input starts a new document, the target is that document's first token: no weight.
  crossing = np.diff(seg, axis=1) > 0
  assert (w[:, :-1][crossing] == 0).all() and (w[:, :-1][~crossing] == 1).all()
  evals = list(data.eval_batches())
  assert len(evals) == len(data.eval_batches()) and evals[0]["inputs"].shape == (8, 32)


def test_windows_on_prepared_data_match_the_stream_and_resume_exactly(tmp_path):
  cfg = _cfg(tmp_path, "tinyshakespeare", val_fraction=0.1)
  root = prepared.ensure(cfg, progress=False)
  tok = prepared.load_tokenizer(root)
  build = lambda **k: pipeline.build_prepared_data(root, cfg, seq_len=16, batch_size=4, seed=7, tokenizer=tok, **k)
  stream = _stream(root)[1]
  it = build().train_iter
  first = [next(it) for _ in range(5)]
  for row_in, row_out in zip(first[0]["inputs"], first[0]["targets"]):
    start = int(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(stream, 16) == row_in).all(1))[0])
    np.testing.assert_array_equal(row_out, stream[start + 1:start + 17])
  resumed = build(start_batch=3).train_iter
  for want in first[3:]:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  # Two processes each read their rows of the same global batches.
  halves = [next(build(rows=r).train_iter) for r in ([0, 1], [2, 3])]
  np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in halves]), first[0]["inputs"])


def test_orbax_checkpoint_of_the_prepared_iterator_resumes_exactly(tmp_path):
  import grain
  import orbax.checkpoint as ocp
  cfg = _cfg(tmp_path, "c4_sample", packing="documents")
  root = prepared.ensure(cfg, progress=False)
  tok = prepared.load_tokenizer(root)
  make = lambda: pipeline.build_prepared_data(root, cfg, seq_len=16, batch_size=4, seed=5, tokenizer=tok).train_iter
  it = make()
  [next(it) for _ in range(3)]
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = [next(it) for _ in range(3)]
    restored = mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(make())))["data"]
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_fraction_uses_the_first_part_of_the_train_split(tmp_path):
  cfg = _cfg(tmp_path, "alice", packing="documents", val_fraction=0.2)
  root = prepared.ensure(cfg, progress=False)
  st = store.TokenStore(root)
  full = loader.Split(st, "documents", 16, 0.2)
  half = loader.Split(st, "documents", 16, 0.2, fraction=0.5)
  assert len(half.train_ids()) == pytest.approx(len(full.train_ids()) / 2, abs=2)
  assert half.val_ids() == full.val_ids()


# ---------------------------------------------------------------- TFDS catalog corpora

def _catalog_builder():
  import tensorflow_datasets as tfds

  class JaxlmTestCorpus(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.2.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
                                   disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(20)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"text": f"catalog document {i}"}
  return JaxlmTestCorpus


def test_tfds_catalog_corpus_is_read_through_its_data_source(tmp_path):
  import tensorflow_datasets as tfds
  builder = _catalog_builder()(data_dir=str(tmp_path / "tfds"), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  cfg = _cfg(tmp_path, "tfds:jaxlm_test_corpus", tfds_data_dir=str(tmp_path / "tfds"))
  assert catalog.dataset_dir(cfg["corpus"], cfg["tfds_data_dir"]).endswith("1.2.0")
  root = prepared.prepare(cfg, progress=False)
  tok = prepared.load_tokenizer(root)
  st, tokens, _, _ = _stream(root)
  assert st.n_docs == 20 and tok.decode(tokens).startswith("catalog document 0\n\ncatalog document 1\n\n")


def test_tfds_corpus_not_prepared_offline_is_a_one_line_error_at_once(tmp_path):
  cfg = _cfg(tmp_path, "tfds:tiny_shakespeare", tfds_data_dir=str(tmp_path / "empty"))
  started = time.perf_counter()
  with pytest.raises(FileNotFoundError) as e:
    prepared.ensure(cfg, progress=False)
  assert time.perf_counter() - started < 5
  assert "\n" not in str(e.value) and "tfds:tiny_shakespeare" in str(e.value) and "never downloads" in str(e.value)
  with pytest.raises(ValueError, match="tfds:NAME"):
    catalog.parse("tfds:")


def test_decoder_attends_within_its_segment_only():
  """A packed row's second document gets the logits it gets alone (RoPE is relative), and the loss sees it."""
  import jax
  import jax.numpy as jnp
  from jaxlm.models import build_model
  cfg, module = build_model({"arch": "decoder", "vocab_size": 50, "d_model": 32, "n_layers": 1, "n_heads": 2,
                             "d_ff": 64, "max_seq_len": 16})
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (1, 12)), jnp.int32)
  params = jax.jit(module.init)({"params": jax.random.key(0)}, tokens)["params"]
  segments = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
  logits = jax.jit(lambda t, s: module.apply({"params": params}, t, segment_ids_BxT=s))
  packed = logits(tokens, segments)
  alone = logits(tokens[:, 5:], None)
  np.testing.assert_allclose(packed[:, 5:], alone, atol=2e-5)
  mixed = logits(tokens, None)
  assert not np.allclose(mixed[:, 5:], alone, atol=1e-3)  # without segments the first document leaks in
  batch = {"inputs": tokens, "targets": tokens, "weights": jnp.ones((1, 12)), "segment_ids": segments}
  loss = jax.jit(lambda b: module.apply({"params": params}, b, method="loss")[0])
  with_segments = loss(batch)
  without = loss({k: v for k, v in batch.items() if k != "segment_ids"})
  assert not np.isclose(with_segments, without)


@pytest.mark.parametrize("arch", ["hrm", "hrm_text1"])
def test_hrm_families_attend_within_their_segment_only(arch):
  """HRM and HRM-Text1 take segment ids too: a packed row's second document gets the logits it gets alone (RoPE is
  relative; the untrained halting runs every segment / pondering step either way), and both losses see them."""
  import jax
  import jax.numpy as jnp
  from jaxlm.models import build_model
  sizes = {"hrm": dict(n_cycles=1, t_steps=1, halt_max_steps=2, train_mode="act"),
           "hrm_text1": dict(n_layers=1, halt_max_steps=2, dropout=0.0, attention_dropout=0.0, mlp_dropout=0.0)}
  cfg, module = build_model({"arch": arch, "vocab_size": 50, "d_model": 32, "n_heads": 2, **sizes[arch]})
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (1, 12)), jnp.int32)
  params = jax.jit(module.init)({"params": jax.random.key(0)}, tokens)["params"]
  segments = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
  logits = jax.jit(lambda t, s: module.apply({"params": params}, t, segment_ids_BxT=s))
  packed, alone = logits(tokens, segments), logits(tokens[:, 5:], None)
  np.testing.assert_allclose(packed[:, 5:], alone, atol=2e-5)
  assert not np.allclose(logits(tokens, None)[:, 5:], alone, atol=1e-3)  # without segments the first one leaks in
  batch = {"inputs": tokens, "targets": tokens, "weights": jnp.ones((1, 12)), "segment_ids": segments}
  loss = jax.jit(lambda b: module.apply({"params": params}, b, deterministic=False, method="loss",
                                        rngs={"dropout": jax.random.key(1)})[0])
  assert not np.isclose(loss(batch), loss({k: v for k, v in batch.items() if k != "segment_ids"}))


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_training_on_prepared_documents_resumes_exactly_without_tokenizing(tmp_path, monkeypatch):
  """jaxlm.train prepares once; the resumed run reads the same dataset (no tokenizer runs) from the next batch."""
  from jaxlm import trainer
  from jaxlm.config_defaults import load_config
  from jaxlm.metrics import read_metrics

  def config():
    c = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                 "yinggem.py:tiny"))
    c.model.update(d_model=32, n_layers=1, n_heads=2, d_ff=64, attention_window=16, max_seq_len=16)
    c.data.update(corpus="c4_sample", packing="documents", eval_batches=2, cache_dir=str(tmp_path / "cache"))
    c.opt.update(warmup_steps=2)
    c.train.update(steps=6, batch_size=8, seq_len=16, eval_every=3, save_every=3, log_every=1, sample_tokens=0,
                   progress=False)
    return c

  def losses(workdir):
    return [r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]

  trainer.train_and_evaluate(config(), str(tmp_path / "full"))
  assert len(os.listdir(tmp_path / "cache")) == 1
  trainer.train_and_evaluate(config(), str(tmp_path / "split"), stop_after_steps=3)
  monkeypatch.setattr(tokenize_pool, "tokenize", lambda *a, **k: pytest.fail("tokenized on resume"))
  trainer.train_and_evaluate(config(), str(tmp_path / "split"))
  np.testing.assert_allclose(losses(tmp_path / "full"), losses(tmp_path / "split"), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_two_processes_train_on_data_process_0_prepared(tmp_path):
  """Process 0 prepares into an empty cache and process 1 opens the same dataset (it would fail if it could not
  see it); each reads its rows of the packed documents. That the losses equal one process's is
  test_multiprocess.py's test_two_processes_give_the_same_losses_as_one, which also trains on prepared data."""
  from tests.multiprocess import run_tasks
  cache = tmp_path / "cache"
  task = {"name": "two", "workdir": str(tmp_path / "two"), "mesh": {"data": -1}, "model": {"n_layers": 1},
          "train": {"steps": 3, "eval_every": 0, "save_every": 100},
          "data": {"corpus": "c4_sample", "packing": "documents", "cache_dir": str(cache)}}
  two = run_tasks([task], processes=2, devices=2)["two"]
  assert two["processes"] == 2 and two["step"] == 3 and len(two["losses"]) == 3
  assert np.isfinite([l for _, l in two["losses"]]).all()
  assert [name for name in os.listdir(cache) if not name.startswith(".")] == os.listdir(cache)
  assert len(os.listdir(cache)) == 1


def test_language_filter_keeps_the_named_language(tmp_path):
  texts = ["The committee will meet again next week to discuss the budget for the new school library.",
           "El comité se reunirá de nuevo la próxima semana para hablar del presupuesto de la biblioteca.",
           "We walked along the river until the sun went down behind the old mill on the hill."]
  corpus = _write_jsonl_gz(tmp_path / "mixed.jsonl.gz", texts)
  english = [sources.document_text(d) for d in sources.iter_documents(corpus, language="en")]
  assert english == [texts[0], texts[2]]
  spanish = prepared.prepare(_cfg(tmp_path, corpus, language="es"), progress=False)
  assert store.TokenStore(spanish).n_docs == 1


def test_mixture_draws_from_each_corpus_in_proportion_with_one_vocabulary(tmp_path):
  a = _write_jsonl_gz(tmp_path / "a.jsonl.gz", ["aaaa bbbb " * 30] * 40)
  b = _write_jsonl_gz(tmp_path / "b.jsonl.gz", ["xxxx yyyy " * 30] * 40)
  cfg = _cfg(tmp_path, "unused", mixture=f"{a}=3,{b}=1", packing="documents")
  roots = prepared.ensure_all(cfg, progress=False)
  assert len(roots) == 2 and prepared.find_all(cfg) == roots
  tok = prepared.load_tokenizer(roots[0])
  assert set("abxy") <= set(tok.chars)  # the char vocabulary covers both corpora
  assert prepared.load_tokenizer(roots[1]).chars == tok.chars
  build = lambda **k: pipeline.build_prepared_data(roots, cfg, seq_len=16, batch_size=8, seed=0, tokenizer=tok, **k)
  it = build().train_iter
  batches = [next(it) for _ in range(20)]
  from_a = sum((np.isin(b["inputs"], tok.encode("ab")).any(1)).sum() for b in batches)
  assert from_a == 120  # 3 of every 4 rows
  resumed = next(build(start_batch=19).train_iter)
  np.testing.assert_array_equal(resumed["inputs"], batches[19]["inputs"])
  assert len(list(build().eval_batches())) == len(build().eval_batches()) >= 2
  with pytest.raises(ValueError, match="data.mixture"):
    prepared.components({**cfg, "mixture": f"{a}=x"})
