"""Issue 13 item 6: data.replay mixes earlier corpora into a continued run's training examples (not its
validation), taken from the parent's lineage unless data.replay_corpus names them; datasets tokenized with a
parent's grown vocabulary are kept apart from those of the vocabulary a fresh run learns."""
import json
import os

import numpy as np
import pytest

from jaxlm.config_defaults import load_config
from jaxlm.data import prepared

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(**values):
  return {**load_config(os.path.join(ROOT, "configs", "yinggem.py:tiny")).data.to_dict(), **values}


def test_replay_takes_its_share_of_the_examples_and_is_not_evaluated():
  parts = prepared.components(_data(corpus="tinyshakespeare", replay=0.25, replay_corpus="alice, looking_glass"))
  assert [(s["corpus"], w, s["replay_component"]) for s, w in parts] == [
      ("tinyshakespeare", 0.75, False), ("alice", 0.125, True), ("looking_glass", 0.125, True)]
  assert all(s["vocab_from"] == ["tinyshakespeare", "alice", "looking_glass"] for s, _ in parts)  # char: one vocabulary
  mixed = prepared.components(_data(mixture="tinyshakespeare=3,dolly_sample=1", replay=0.2,
                                    replay_corpus="alice,tinyshakespeare"))  # what the run trains on is not replayed
  assert [(s["corpus"], round(w, 6)) for s, w in mixed] == [("tinyshakespeare", 0.6), ("dolly_sample", 0.2),
                                                            ("alice", 0.2)]
  assert prepared.components(_data(corpus="alice", replay=0.0, replay_corpus="looking_glass")) == [
      (_data(corpus="alice", replay=0.0, replay_corpus="looking_glass"), 1.0)]
  with pytest.raises(ValueError, match=r"data.replay=0.3: no corpus to replay; set data.replay_corpus"):
    prepared.components(_data(corpus="alice", replay=0.3, replay_corpus="alice"))


def test_earlier_corpora_come_from_the_lineage_mixtures_split():
  history = [{"corpus": "alice+looking_glass"}, {"corpus": "c4_sample=3,alice=1"}, {"corpus": "alice"}, {}]
  assert prepared.earlier_corpora(history) == ["alice+looking_glass", "c4_sample", "alice"]
  assert prepared.label(_data(mixture="a=1,b=2")) == "a=1,b=2" and prepared.label(_data(corpus="x")) == "x"


def test_a_given_vocabulary_keys_its_own_dataset(tmp_path):
  from jaxlm.data.tokenizers import CharTokenizer, digest
  cfg = _data(corpus="alice", cache_dir=str(tmp_path))
  grown = CharTokenizer(sorted(set(open(os.path.join(ROOT, "jaxlm/data/corpora/alice.txt")).read())) + ["~"])
  assert digest(grown) == digest(CharTokenizer(list(grown.chars))) != digest(CharTokenizer(grown.chars[:-1]))
  assert prepared.dataset_key(cfg) != prepared.dataset_key(cfg, digest(grown))
  with pytest.raises(ValueError, match="must be prepared with that tokenizer"):
    prepared.prepare(cfg, progress=False, tokenizer_digest=digest(grown))  # a digest names its tokenizer
  root = prepared.ensure(cfg, tokenizer=grown, progress=False, tokenizer_digest=digest(grown))
  assert prepared.find(cfg) is None and prepared.find(cfg, digest(grown)) == root
  assert prepared.load_tokenizer(root).vocab_size == grown.vocab_size


@pytest.mark.slow
def test_a_continued_run_replays_its_parents_corpus_and_a_fresh_run_keeps_its_own_vocabulary(tmp_path):
  """A model of Alice's characters continued on tiny Shakespeare with data.replay=0.5: about half of every
  batch's windows come from Alice, validation is Shakespeare's alone, the history records the replay; then, after
  a continuation without replay, a fresh run on tiny Shakespeare (same data cache, where Shakespeare was tokenized
  with the grown Alice vocabulary) learns its own 65-character vocabulary."""
  from jaxlm import lineage, modeldir, trainer
  from small_models import random_params
  from test_vocab_growth import small_model
  alice = open(os.path.join(ROOT, "jaxlm/data/corpora/alice.txt"), encoding="utf-8").read()
  chars = sorted(set(alice))
  model = {**small_model("optimus_prime"), "vocab_size": len(chars), "max_seq_len": 16, "family": "optimus_prime"}
  parent = modeldir.save_model_dir(str(tmp_path / "parent"), model, random_params(model),
                                   {"kind": "char", "chars": chars}, source={"family": "optimus_prime"},
                                   history=[{"corpus": "alice", "steps": 100}])

  def config(**train):
    c = load_config(os.path.join(ROOT, "configs", "optimus_prime.py:tiny"))
    c.data.update(corpus="tinyshakespeare", format="text", packing="windows", eval_batches=0, val_fraction=0.01)
    c.train.update(steps=1, batch_size=64, seq_len=16, eval_every=0, save_every=1, sample_tokens=0, progress=False,
                   **train)
    return c

  def windows_and_evals(run):
    batch = next(iter(run.data.train_iter))
    rows = [run.data.tokenizer.decode(r) for r in np.asarray(batch["inputs"])]
    return rows, len(run.data.eval_batches())

  c = config(init_from=parent)
  c.data.replay = 0.5
  run = trainer.Trainer(c, str(tmp_path / "continued"))
  try:
    rows, n_eval = windows_and_evals(run)
    from_alice = sum(row in alice for row in rows)
    assert 16 <= from_alice <= 48, from_alice  # 32 expected; Shakespeare's windows are never in Alice's text
    stage = lineage.read(str(tmp_path / "continued"))[-1]
    assert stage["corpus"] == "tinyshakespeare" and stage["replay"] == {"fraction": 0.5, "corpora": ["alice"]}
    assert run.model_dict["vocab_size"] == len(chars) + 2
  finally:
    run.close()
  plain = trainer.Trainer(config(init_from=parent), str(tmp_path / "plain"))  # continued without replay
  try:
    assert windows_and_evals(plain)[1] == n_eval and "replay" not in lineage.read(str(tmp_path / "plain"))[-1]
  finally:
    plain.close()
  fresh = trainer.Trainer(config(), str(tmp_path / "fresh"))  # the same corpus, in the same cache
  try:
    rows, n_eval_fresh = windows_and_evals(fresh)
    assert fresh.model_dict["vocab_size"] == 65 and not any(row in alice for row in rows)
    assert n_eval_fresh == n_eval  # the continued run evaluates on Shakespeare only
    tokens = json.loads((tmp_path / "fresh" / "tokenizer" / "tokenizer.json").read_text())["chars"]
    assert len(tokens) == 65
  finally:
    fresh.close()
