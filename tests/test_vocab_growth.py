"""Vocabulary growth (jaxlm.vocab_growth): on every family (each can train with a char tokenizer), the grown model's
old-token logits equal the parent's bit for bit and the new tokens' total probability is <= 1e-4 at every position
of the parent's text; char vocabularies grow by appending; the trainer grows a parent's vocabulary on a new corpus."""
import json
import os

import jax
import numpy as np
import pytest

from jaxlm import vocab_growth
from jaxlm.config_defaults import load_config
from jaxlm.data.tokenizers import CharTokenizer, VocabTokenizer
from small_models import random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, NEW, WIDTH = 30, 16, 16  # NEW == WIDTH: the probe model is the grown model's shape (one compile less)
SMALL = {  # the smallest model of each family (compilation dominates these tests)
    "hrom": {}, "optimus_prime": {}, "yinggem": {},
    "hrm": dict(l_layers=1, h_layers=1, n_cycles=1, t_steps=1, halt_max_steps=1, train_mode="act"),
    "hrm_text1": dict(n_layers=1, d_ff=32, halt_max_steps=2),
}


def small_model(family):
  model = load_config(os.path.join(ROOT, "configs", f"{family}.py:tiny")).model.to_dict()
  # Model directories hold the per-block layout (yinggem:tiny trains its blocks stacked).
  model.update(vocab_size=VOCAB, d_model=WIDTH, n_heads=2, max_seq_len=8, dtype="float32", **SMALL[family])
  if model["arch"] == "decoder":
    model["scan_layers"] = False
    model.update(n_layers=1, d_ff=32, n_kv_heads=0, head_dim=0, attention_window=4 if model.get("attention_window") else 0)
  return model


def log_softmax(x):
  x = x.astype(np.float64)
  top = x.max(-1, keepdims=True)
  return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


@pytest.mark.parametrize("family", sorted(SMALL))
def test_grown_vocabulary_keeps_old_logits_and_starts_new_tokens_improbable(family):
  model = small_model(family)
  params = random_params(model)
  probe = np.random.default_rng(1).integers(0, VOCAB, size=(2, 8))
  growth = vocab_growth.grow_checked(model, params, NEW, probe)
  assert growth.model_dict["vocab_size"] == VOCAB + NEW
  # Checked here from the two models' logits (the forward is the cached compiled one grow_checked used).
  before = vocab_growth.forward(model, params, probe)
  after = vocab_growth.forward(growth.model_dict, growth.params, probe)
  assert after.shape == before.shape[:-1] + (VOCAB + NEW,)
  new_probability = np.exp(log_softmax(after)[..., VOCAB:]).sum(-1)
  print(f"{family}: old-logit max |diff| {np.max(np.abs(after[..., :VOCAB] - before))}, new-token probability "
        f"max {new_probability.max():.3g} mean {new_probability.mean():.3g} ({growth.figures['rule']})")
  if family == "hrm_text1":  # tied head: XLA may tile the longer table's matmul otherwise (measured 2.4e-7)
    assert np.max(np.abs(after[..., :VOCAB] - before)) <= 1e-6 * np.max(np.abs(before))
  else:
    assert np.array_equal(after[..., :VOCAB], before)  # bit for bit
  assert new_probability.max() <= 1e-4
  if growth.figures["rule"].startswith("rows along minus the max-margin"):
    return  # fitted to the measured positions only (this random tied model's states have no shared mean direction)
  # On text not measured the bound has the 10x margin's slack (same parent, other positions).
  other = np.random.default_rng(2).integers(0, VOCAB, size=(2, 8))
  assert np.exp(log_softmax(vocab_growth.forward(growth.model_dict, growth.params, other))[..., VOCAB:]).sum(-1).max() < 1e-3
  # Old rows are kept as they were.
  old_leaves = jax.tree.leaves(params)
  new_leaves = jax.tree.leaves(growth.params)
  for old, new in zip(old_leaves, new_leaves):
    assert np.array_equal(np.asarray(new)[tuple(slice(0, n) for n in old.shape)], old)


def test_hidden_states_that_surround_the_origin_are_refused():
  hidden = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
  with pytest.raises(ValueError, match="no output row is negative on all 4"):
    vocab_growth.shared_direction(hidden)
  u, how = vocab_growth.shared_direction(np.array([[1.0, 2.0], [1.0, -2.0], [-0.5, 3.0]]))  # mean fails, LP works
  assert how.startswith("max-margin") and np.all(np.array([[1.0, 2.0], [1.0, -2.0], [-0.5, 3.0]]) @ u > 0)


def test_char_vocabularies_grow_by_appending():
  old = CharTokenizer.train("hello world")
  grown = old.extended("hello, new world!")
  assert grown.chars[:old.vocab_size] == old.chars and grown.chars[old.vocab_size:] == sorted(" !,n" .replace(" ", ""))
  assert grown.encode("hello world") == old.encode("hello world")
  vocab = VocabTokenizer(["<PAD>", "<UNK>", "<BOS>", "<EOS>", "a", "b"])
  bigger = vocab.extended("abc")
  assert bigger.tokens[-1] == "c" and bigger.encode("abc") == [4, 5, 6] and bigger.unk_id == 1


def test_a_run_from_a_parent_grows_its_vocabulary_on_a_new_corpus(tmp_path):
  """Alice's characters, continued on tiny Shakespeare ('&' and the straight apostrophe are new)."""
  from jaxlm import lineage, modeldir, trainer
  chars = sorted(set(open(os.path.join(ROOT, "jaxlm/data/corpora/alice.txt"), encoding="utf-8").read()))
  model = {**small_model("optimus_prime"), "vocab_size": len(chars), "max_seq_len": 16, "family": "optimus_prime"}
  params = random_params(model)
  parent = modeldir.save_model_dir(str(tmp_path / "parent"), model, params, {"kind": "char", "chars": chars},
                                   source={"family": "optimus_prime"})
  c = load_config(os.path.join(ROOT, "configs", "optimus_prime.py:tiny"))
  c.data.update(corpus="tinyshakespeare", format="text", packing="windows", eval_batches=1)
  c.train.update(steps=1, batch_size=2, seq_len=16, eval_every=0, save_every=1, log_every=1, sample_tokens=0,
                 progress=False, init_from=parent)
  run = trainer.Trainer(c, str(tmp_path / "work"))
  try:
    assert run.model_dict["vocab_size"] == len(chars) + 2
    grown = jax.device_get(run.state.params)
    assert np.array_equal(np.asarray(grown["embed"]["embedding"])[:len(chars)], params["embed"]["embedding"])
    tokenizer = CharTokenizer(json.loads((tmp_path / "work" / "tokenizer" / "tokenizer.json").read_text())["chars"])
    assert tokenizer.chars[:len(chars)] == chars and sorted(tokenizer.chars[len(chars):]) == ["&", "'"]
    event = lineage.read(str(tmp_path / "work"))[-1]["events"][-1]
    print("trainer growth event:", event)
    assert event["kind"] == "vocab" and event["vocab_after"] == len(chars) + 2 and event["old_logits_bit_equal"]
    assert event["new_probability_max"] <= 1e-4
  finally:
    run.close()
