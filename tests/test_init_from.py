"""train.init_from: a new run starts from a model directory (converted originals of all five families) or another
run's workdir; train.init_optimizer; a fine-tuned converted Optimus Prime exports back and loads in the original's
format."""
import json
import os

import jax
import numpy as np
import optax
import pytest

from convert import api
from jaxlm import lineage, modeldir, trainer
from jaxlm.checkpoint import RunCheckpointer
from jaxlm.config_defaults import load_config
from jaxlm.models import layout
from jaxlm.steps import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
ORIGINALS = {"hrm": "hrm/hrm_continual_learning.pt", "hrm_text1": "hrm_text1", "hrom": "hrom/hrom_20261125_133958_step0.pt",
             "optimus_prime": "optimus_prime/best_model.pt", "yinggem": "yinggem/yinggem_best.pth"}


def ids_corpus(path, vocab, n=4000, seed=0):
  """A corpus for the `ids` tokenizer that converted models without their original tokenizer carry."""
  ids = np.random.default_rng(seed).integers(0, vocab, size=n)
  path.write_text(" ".join(map(str, ids)))
  return str(path)


def run_config(family, tmp_path, init_from, **train):
  c = load_config(os.path.join(ROOT, "configs", f"{family}.py:tiny"))
  tokenizer = json.load(open(os.path.join(init_from, "tokenizer.json"))) if os.path.isfile(
      os.path.join(init_from, "tokenizer.json")) else {"kind": "char"}
  c.data.update(eval_batches=1, packing="windows", format="text", text_field="text",
                corpus=(ids_corpus(tmp_path / "ids.txt", tokenizer["vocab_size"]) if tokenizer["kind"] == "ids"
                        else "alice"))
  c.opt.update(warmup_steps=1)
  c.train.update(steps=3, batch_size=4, seq_len=16, eval_every=0, save_every=3, log_every=1, sample_tokens=0,
                 progress=False, init_from=init_from, **train)
  return c


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
  root = tmp_path_factory.mktemp("originals")
  return {family: api.torch2jax(os.path.join(FIXTURES, src), str(root / family)) for family, src in ORIGINALS.items()}


def same_tree(a, b):
  return jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b))


@pytest.mark.parametrize("family", sorted(ORIGINALS))
def test_a_run_starts_from_a_converted_original(originals, family, tmp_path):
  c = run_config(family, tmp_path, originals[family])
  c.model.d_model = 24  # the parent decides the architecture, not the config file
  c.model.dtype = "float32"  # fields that only change the computation stay the config's
  run = trainer.Trainer(c, str(tmp_path / "work"))
  try:
    parent = modeldir.load(originals[family])
    assert run.start_step == 0 and int(run.state.step) == 0
    # The parent's arrays (HRM's vocab tokenizer lacks some of Alice's characters: its vocabulary grows, old rows
    # kept), in the run's layout (yinggem:tiny stacks its blocks: compared per block).
    run_params = layout.to_per_block(run.model_dict, jax.device_get(run.state.params))[1]
    assert same_tree(jax.tree.map(lambda x, y: np.asarray(x)[tuple(map(slice, np.shape(y)))],
                                  run_params, parent.params), parent.params)
    assert run.model_dict.get("scan_layers", False) == (family == "yinggem")
    assert (run.model_dict["vocab_size"] > parent.model_dict["vocab_size"]) == (family == "hrm")
    assert run.model_dict["d_model"] == parent.model_dict["d_model"] and run.model_dict["family"] == family
    written = json.loads((tmp_path / "work" / "config.json").read_text())
    assert written["model"]["d_model"] == parent.model_dict["d_model"]
    assert (tmp_path / "work" / "tokenizer" / "tokenizer.json").exists()
    history = written["history"]  # the parent's lineage, then this run's entry
    assert history[:-1] == lineage.read(originals[family]) and history[-1]["from"] == originals[family]
    assert history[-1]["params"] == run.n_params and history[-1]["finished"] is None
    if family == "hrm":  # the original's datasets_trained, imported
      assert [e["corpus"] for e in history] == ["fixture", str(c.data.corpus)]
      assert history[0]["finished"] == "2025-01-01T00:00:00"
  finally:
    run.close()


def parent_workdir(tmp_path, family="yinggem"):
  """A workdir holding one checkpoint with a non-trivial optimizer state, as the trainer writes it."""
  model = load_config(os.path.join(ROOT, "configs", f"{family}.py:tiny")).model.to_dict()
  chars = sorted(set(open(os.path.join(ROOT, "jaxlm/data/corpora/alice.txt"), encoding="utf-8").read()))
  model.update(vocab_size=len(chars), d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16, family=family)
  from jaxlm.models import build_model
  import jax.numpy as jnp
  from small_models import random_params
  cfg, _ = build_model(model)
  params = random_params(model, seed=3)
  c = load_config(os.path.join(ROOT, "configs", f"{family}.py:tiny"))
  from jaxlm import optim
  optimizer, _ = optim.make_optimizer(c.opt, c.train.steps)
  # Moments that are not zeros (as after updates), without compiling an update.
  opt_state = jax.tree.map(lambda x: np.asarray(x) + 0.5 if np.ndim(x) > 0 else x, optimizer.init(params))
  work = tmp_path / "parent"
  run = RunCheckpointer(str(work))
  run.save(7, TrainState(step=jnp.int32(7), params=params, opt_state=opt_state),
           {"model": {**cfg.to_dict(), "family": family}, "opt": c.opt.to_dict()})
  run.close()
  from jaxlm.data.tokenizers import CharTokenizer
  CharTokenizer(chars).save(str(work / "tokenizer"))
  return str(work), params, opt_state


def test_init_optimizer_takes_the_parent_workdirs_optimizer_state(tmp_path):
  work, params, opt_state = parent_workdir(tmp_path)
  c = run_config("yinggem", tmp_path, work, init_optimizer=True)
  c.data.corpus = "alice"
  run = trainer.Trainer(c, str(tmp_path / "fresh"))
  try:
    assert int(run.state.step) == 0
    assert same_tree(jax.device_get(run.state.params), params)
    assert same_tree(jax.device_get(run.state.opt_state), opt_state)
  finally:
    run.close()
  c.train.init_optimizer = False
  run = trainer.Trainer(c, str(tmp_path / "fresh2"))
  try:
    moments = [x for x in jax.tree.leaves(jax.device_get(run.state.opt_state)) if np.ndim(x) > 0]
    assert moments and all(not np.any(x) for x in moments)  # a fresh optimizer: zero moments
  finally:
    run.close()


def test_init_optimizer_from_a_model_directory_is_refused(originals, tmp_path):
  c = run_config("optimus_prime", tmp_path, originals["optimus_prime"], init_optimizer=True)
  with pytest.raises(ValueError, match="optimizer state exists only in a workdir"):
    trainer.Trainer(c, str(tmp_path / "work"))


def test_a_missing_parent_is_named(tmp_path):
  c = run_config("yinggem", tmp_path, str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="init_from=.*nope.*does not exist"):
    trainer.Trainer(c, str(tmp_path / "work"))
  (tmp_path / "empty").mkdir()
  c.train.init_from = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="neither a model directory"):
    trainer.Trainer(c, str(tmp_path / "work2"))


@pytest.mark.slow
def test_fine_tuned_optimus_prime_exports_back_and_loads_in_the_original_format(originals, tmp_path, config_module):
  torch = pytest.importorskip("torch")
  import sys
  sys.path.insert(0, os.path.dirname(__file__))
  from test_convert_families import OptimusReference, forward
  c = run_config("optimus_prime", tmp_path, originals["optimus_prime"])
  c.opt.lr = 1e-2
  work = str(tmp_path / "work")
  result = trainer.train_and_evaluate(c, work)
  assert result.step == 3
  tuned, original = modeldir.load(work), modeldir.load(originals["optimus_prime"])
  assert not same_tree(tuned.params, original.params)  # it trained
  last = lineage.read(work)[-1]
  assert (last["steps"], last["tokens"]) == (3, 3 * 4 * 16) and last["chars"] > last["tokens"] and last["finished"]
  out = api.jax2torch(work, str(tmp_path / "best_model.pt"))
  state = torch.load(out, weights_only=False)["model_state_dict"]
  m = tuned.model_dict
  reference = OptimusReference(m["vocab_size"], m["d_model"], m["n_layers"], m["n_heads"], m["n_kv_heads"],
                               m["d_ff"]).eval()
  reference.load_state_dict(state, strict=True)
  ids = np.random.default_rng(1).integers(0, m["vocab_size"], size=(2, 11)).astype(np.int32)
  with torch.no_grad():
    expected = reference(torch.tensor(ids).long()).numpy()
  from jaxlm.models import build_model
  _, module = build_model(tuned.model_dict)
  got = forward(module, tuned.params, ids)
  assert np.max(np.abs(got - expected)) <= 1.5e-6 * np.max(np.abs(expected)) + 1e-7


def test_hrm_export_records_the_history_as_datasets_trained(originals, tmp_path):
  torch = pytest.importorskip("torch")
  parent = modeldir.load(originals["hrm"])
  history = lineage.read(originals["hrm"]) + [lineage.entry("alice+looking_glass"), lineage.entry("fixture")]
  model_dir = modeldir.save_model_dir(str(tmp_path / "m"), parent.model_dict, parent.params,
                                      json.load(open(os.path.join(originals["hrm"], "tokenizer.json"))),
                                      parent.source, history=history)
  out = api.jax2torch(model_dir, str(tmp_path / "hrm.pt"))
  assert torch.load(out, weights_only=False)["datasets_trained"] == ["fixture", "alice+looking_glass"]
