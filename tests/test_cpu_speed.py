"""Issue 14's levers: Muon (which parameters it orthogonalises, and that it does), evaluations on a fixed random
subset with the whole split at the end and at the target, one CPU device per core, the persistent compilation
cache, and the speedrun command end to end."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlm import host_devices, optim, trainer
from jaxlm.models import layout
from jaxlm.metrics import read_metrics
from test_train import ROOT, small_config


def test_muon_takes_block_matrices_by_their_axis_names():
  dims = lambda names, kernel=True: optim._muon_dimensions(names, len(names), kernel)
  q = dims(("embed", "heads", "head_dim"))
  assert (q.reduction_axis, q.output_axis) == ((0,), (1, 2))
  out = dims(("heads", "head_dim", "embed"))
  assert (out.reduction_axis, out.output_axis) == ((0, 1), (2,))
  scanned_gated = dims(("layers", "embed", None, "mlp"))  # layers and the gate/value pair are batch axes
  assert (scanned_gated.reduction_axis, scanned_gated.output_axis) == ((1,), (3,))
  assert dims(("vocab", "embed")) is None and dims(("embed", "vocab")) is None  # embedding, head: AdamW
  assert dims(("heads", "head_dim"), kernel=False) is None and dims(("layers", "embed")) is None


def _first_update(tmp_path, name):
  c = small_config(steps=1, eval_every=0, save_every=1, sample_tokens=0)
  c.opt.update(name=name, lr=0.01, adam_lr=0.01, warmup_steps=0, schedule="constant", weight_decay=0.0, clip_norm=0.0)
  run = trainer.Trainer(c, str(tmp_path / name))
  try:
    before = jax.device_get(run.state.params)
    run.run()
    after = jax.device_get(run.state.params)
  finally:
    run.close()
  update = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), after, before)
  # tiny stacks its blocks (model.scan_layers): Muon orthogonalises each block's slice of a stacked matrix.
  assert layout.is_stacked(update)
  return layout.unstack_layers(update, c.model.n_layers)


def test_muon_orthogonalises_block_updates_and_leaves_the_rest_to_adamw(tmp_path):
  """One step from the same start: Muon's update of an MLP output matrix has nearly equal singular values (a
  Newton-Schulz orthogonalised momentum), AdamW's does not; the embedding's update is Adam's in both."""
  muon, adamw = _first_update(tmp_path, "muon"), _first_update(tmp_path, "adamw")
  # Singular values of the update / lr, largest first: Muon's are ~1 (the quintic Newton-Schulz leaves them in
  # about [0.7, 1.2], a few of the smallest lower); AdamW's elementwise update spreads them over a decade.
  values = lambda m: np.linalg.svd(m.reshape(m.shape[0], -1), compute_uv=False) / 0.01
  s_muon = values(muon["layers_0"]["mlp"]["wo"]["kernel"])
  s_adamw = values(adamw["layers_0"]["mlp"]["wo"]["kernel"])
  spread = lambda s: s[0] / s[int(0.8 * len(s))]
  print(f"first wo update / lr: muon top {s_muon[0]:.2f}, spread {spread(s_muon):.2f}; adamw spread {spread(s_adamw):.2f}")
  assert 0.8 < s_muon[0] < 1.5 and spread(s_muon) < 2.5 and spread(s_adamw) > 4.0
  # The embedding gets Adam under both (Muon's Adam half is Nesterov's, so its first step is 1.47x as long).
  emb_muon, emb_adamw = muon["embed"]["embedding"], adamw["embed"]["embedding"]
  moved = np.abs(emb_adamw) > 1e-4
  ratio = emb_muon[moved] / emb_adamw[moved]
  assert moved.sum() > 100 and np.ptp(ratio) < 1e-3 and 1.0 <= ratio.mean() < 2.0


def test_eval_subset_during_training_the_whole_split_at_the_end_and_at_the_target(tmp_path):
  c = small_config(steps=6, eval_every=2, save_every=6, eval_windows=8)
  trainer.train_and_evaluate(c, str(tmp_path / "plain"))
  evals = [(r["step"], r["eval_full"]) for r in read_metrics(tmp_path / "plain" / "metrics.jsonl") if "eval_loss" in r]
  assert evals == [(2, False), (4, False), (6, True)]

  c = small_config(steps=6, eval_every=2, save_every=6, eval_windows=8, target_eval_loss=50.0)
  result = trainer.train_and_evaluate(c, str(tmp_path / "target"))
  rows = [r for r in read_metrics(tmp_path / "target" / "metrics.jsonl") if "eval_loss" in r]
  assert [(r["step"], r["eval_full"]) for r in rows] == [(2, False), (2, True)]  # the subset, then the confirmation
  assert result.step == 2 and result.stopped_early and rows[0]["eval_loss"] != rows[1]["eval_loss"]


def test_eval_subset_is_fixed_random_and_whole_batches():
  from jaxlm.data import loader

  class Store:  # a token stream of 10,000 tokens, 10% validation
    n_tokens, n_docs = 10_000, 1
  split = loader.Split(Store(), "windows", 16, 0.1)
  full = loader.EvalBatches.__new__(loader.EvalBatches)
  full.ids, full.batch_size, full.rows = np.asarray(split.val_ids(), np.int64), 8, None
  part = full.subset(20, seed=3)
  assert part.windows == 24 and len(part) == 3  # rounded up to whole batches
  assert set(part.ids) <= set(full.ids) and list(part.ids) == sorted(part.ids)
  assert list(full.subset(20, seed=3).ids) == list(part.ids) != list(full.subset(20, seed=4).ids)
  assert full.subset(10_000, seed=3).windows == full.windows


def test_one_cpu_device_per_core_divides_the_batches(monkeypatch):
  c = small_config()
  c.train.update(batch_size=12, eval_batch_size=96)
  c.mesh.cpu_devices = -1
  assert [host_devices.choose(c, n) for n in (1, 2, 4, 5, 8, 16)] == [1, 2, 4, 4, 6, 12]
  c.opt.grad_accum = 3  # microbatches of 4
  assert host_devices.choose(c, 8) == 4
  c.mesh.cpu_devices = 3
  assert host_devices.choose(c, 8) == 3
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  assert host_devices.configure(c) is None  # the environment chose


def test_batches_placed_several_at_a_time_train_exactly_as_one_a_step(tmp_path):
  """train.batches_per_put=3 (each step indexes its batch out of 3 placed at once) gives the same losses and the
  same parameters, bit for bit, as one batch a step, over 7 steps (a chunk cut short) with an evaluation and a
  checkpoint between; interrupted after step 4 (inside a chunk) and resumed, it still ends the same."""
  from jaxlm.checkpoint import RunCheckpointer, restore_for_inference

  def train(name, per_put, stop_after=None):
    c = small_config(steps=7, eval_every=4, save_every=4, batches_per_put=per_put)
    c.mesh.cpu_devices = 2  # the batch sharded over two devices, as in the CPU recipes
    trainer.train_and_evaluate(c, str(tmp_path / name), stop_after_steps=stop_after)
    return tmp_path / name

  one, three = train("one", 1), train("three", 3)
  train("resumed", 3, stop_after=4)
  assert RunCheckpointer(str(tmp_path / "resumed")).read_meta(4)["data_position"] == 4
  resumed = train("resumed", 3)
  rows = lambda run: [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_metrics(run / "metrics.jsonl")
                      if "loss" in r or "eval_loss" in r]
  assert rows(one) == rows(three) == rows(resumed) and len(rows(one)) == 7 + 2
  want = restore_for_inference(str(one))[1]
  for run in (three, resumed):
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(restore_for_inference(str(run))[1])):
      assert np.array_equal(a, b)


def test_compilation_cache_is_on_by_default_and_can_be_turned_off(tmp_path):
  script = "import jax; from jaxlm import compile_cache; print(compile_cache.enable(), jax.config.jax_compilation_cache_dir)"
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "JAXLM_COMPILATION_CACHE")}
  run = lambda **extra: subprocess.run([sys.executable, "-c", script], env={**env, **extra}, cwd=ROOT,
                                       capture_output=True, text=True, check=True).stdout.split()
  expected = str(tmp_path / "jaxlm" / "xla")
  assert run(XDG_CACHE_HOME=str(tmp_path)) == [expected, expected]
  assert run(XDG_CACHE_HOME=str(tmp_path), JAXLM_COMPILATION_CACHE="0") == ["None", "None"]
  assert run(JAXLM_COMPILATION_CACHE=str(tmp_path / "c")) == [str(tmp_path / "c")] * 2


@pytest.mark.slow
def test_speedrun_command_uses_a_device_per_core_and_stops_at_its_target(tmp_path):
  """The speedrun config as a command, shortened: a device per core, Muon, subset evaluations, and a target
  loose enough to be reached at the first evaluation (confirmed on the whole split)."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  out = subprocess.run([sys.executable, "-m", "jaxlm.train", "--config", "configs/yinggem.py:speedrun",
                        "--workdir", str(tmp_path / "w"), "--config.train.progress=False",
                        "--config.train.target_eval_loss=4.0", "--config.train.sample_tokens=0"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  from jaxlm.config_defaults import load_config
  devices = host_devices.choose(load_config(os.path.join(ROOT, "configs/yinggem.py:speedrun")), host_devices.cores())
  assert f"mesh {{'data': {devices}, 'fsdp': 1, 'model': 1}}" in out.stderr
  rows = [r for r in read_metrics(tmp_path / "w" / "metrics.jsonl") if "eval_loss" in r]
  assert [(r["step"], r["eval_full"]) for r in rows] == [(10, False), (10, True)] and rows[-1]["eval_loss"] <= 4.0
  config = json.loads((tmp_path / "w" / "config.json").read_text())
  assert config["config"]["opt"]["name"] == "muon" and config["model"]["n_layers"] == 2


def test_a_checkpoint_written_on_several_devices_loads_for_inference_on_one(tmp_path):
  """yinggem:tiny trains on one device per core: generate, score, chat and init_from read its checkpoints in a
  process with one device (as the Colab notebook does)."""
  script = f"""
import jax
jax.config.update("jax_num_cpu_devices", 2)
from test_train import small_config
from jaxlm import trainer
c = small_config(steps=1, eval_every=0, save_every=1)
trainer.train_and_evaluate(c, {str(tmp_path / 'w')!r})
print("devices", jax.device_count())
"""
  env = {**{k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")},
         "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
  out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0 and "devices 2" in out.stdout, out.stderr[-3000:]
  one = subprocess.run([sys.executable, "-c", "from jaxlm.checkpoint import restore_for_inference as r; import jax; "
                        f"m, p, _ = r({str(tmp_path / 'w')!r}); print(jax.device_count(), len(jax.tree.leaves(p)))"],
                       env=env, cwd=ROOT, capture_output=True, text=True)
  assert one.returncode == 0, one.stderr[-3000:]
  assert one.stdout.split()[0] == "1" and int(one.stdout.split()[1]) > 10
