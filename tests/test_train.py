"""Training end to end: metrics/checkpoints written, resume equals uninterrupted (device counts and processes:
test_multiprocess.py)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxlm import trainer
from jaxlm.checkpoint import RunCheckpointer, restore_for_inference
from jaxlm.config_defaults import load_config
from jaxlm.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "yinggem.py:tiny")


def small_config(model=None, **train):
  c = load_config(TINY)
  c.model.update(d_model=32, n_layers=2, n_heads=2, d_ff=64, attention_window=16, max_seq_len=16)
  c.model.update(**(model or {}))
  c.data.update(eval_batches=2)
  c.opt.update(warmup_steps=2)
  c.train.update(steps=10, batch_size=8, seq_len=16, eval_every=5, save_every=5, log_every=1,
                 sample_tokens=0, progress=False)
  c.train.update(**train)
  return c


def losses(workdir, key="loss"):
  return [(r["step"], r[key]) for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


def test_short_run_writes_everything_and_learns(tmp_path):
  c = small_config(steps=40, eval_every=20, save_every=20, log_every=10, sample_tokens=20)
  c.opt.lr = 3e-3
  result = trainer.train_and_evaluate(c, str(tmp_path))
  assert result.step == 40 and not result.interrupted
  rows = read_metrics(tmp_path / "metrics.jsonl")
  train_rows = [r for r in rows if "loss" in r]
  eval_rows = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in train_rows] == [10, 20, 30, 40]
  assert all(r["tokens_per_sec"] > 0 for r in train_rows)
  assert [r["step"] for r in eval_rows] == [20, 40]
  assert train_rows[-1]["loss"] < train_rows[0]["loss"] < np.log(65) + 0.5
  assert (tmp_path / "loss_curve.png").stat().st_size > 1000
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
  assert RunCheckpointer(str(tmp_path)).latest_step() == 40
  assert json.loads((tmp_path / "config.json").read_text())["model"]["vocab_size"] == 65
  assert isinstance(result.sample, str) and len(result.sample) >= 20
  model, params, tok_dir = restore_for_inference(str(tmp_path), "best")
  assert model["d_model"] == 32 and os.path.exists(os.path.join(tok_dir, "tokenizer.json"))


def test_resume_gives_the_same_loss_trajectory(tmp_path):
  """With dropout on: the resumed run continues the dropout keys (fold_in(seed key, step), not restarted) and
  the data (the batch after the last one trained) exactly where the interrupted run stopped."""
  dropout = dict(dropout=0.2, attention_dropout=0.2)
  full, split, plain = tmp_path / "full", tmp_path / "split", tmp_path / "no_dropout"
  trainer.train_and_evaluate(small_config(dropout, steps=12), str(full))
  first = trainer.train_and_evaluate(small_config(dropout, steps=12), str(split), stop_after_steps=7)
  assert first.interrupted is False and first.step == 7
  second = trainer.train_and_evaluate(small_config(dropout, steps=12), str(split))
  assert second.step == 12
  a, b = losses(full), losses(split)
  assert [s for s, _ in b] == list(range(1, 13))  # rows past the restored step were not duplicated
  np.testing.assert_allclose([l for _, l in a], [l for _, l in b], rtol=0, atol=1e-6)
  # dropout is really on: without it the first step (same initial parameters, same batch) has another loss.
  # (steps=3, no eval: the program test_grad_accumulation_equals_one_big_batch compiles too)
  trainer.train_and_evaluate(small_config(steps=3, eval_every=0), str(plain), stop_after_steps=1)
  assert abs(a[0][1] - losses(plain)[0][1]) > 1e-5


def test_grad_accumulation_equals_one_big_batch(tmp_path):
  """Every microbatch counts: the loss and the gradient norm of each step equal those of the whole batch."""
  one = trainer.train_and_evaluate(small_config(steps=3, eval_every=0), str(tmp_path / "a"))
  c = small_config(steps=3, eval_every=0)
  c.opt.grad_accum = 4
  four = trainer.train_and_evaluate(c, str(tmp_path / "b"))
  np.testing.assert_allclose([l for _, l in losses(tmp_path / "a")], [l for _, l in losses(tmp_path / "b")],
                             atol=2e-5)
  np.testing.assert_allclose([g for _, g in losses(tmp_path / "a", "grad_norm")],
                             [g for _, g in losses(tmp_path / "b", "grad_norm")], rtol=1e-4)
  assert one.step == four.step == 3


def test_workdir_with_a_different_model_is_refused(tmp_path):
  trainer.train_and_evaluate(small_config(steps=2, eval_every=0), str(tmp_path))
  c = small_config(steps=4, eval_every=0)
  c.model.d_model = 48
  with pytest.raises(ValueError, match="holds a different model.*d_model: checkpoint 32 vs config 48"):
    trainer.train_and_evaluate(c, str(tmp_path))


def test_half_written_checkpoint_is_ignored_on_resume(tmp_path):
  trainer.train_and_evaluate(small_config(steps=5, eval_every=0), str(tmp_path))
  # What a crash in the middle of saving step 9 leaves behind: Orbax's temporary directory.
  junk = tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1234567"
  (junk / "state").mkdir(parents=True)
  (junk / "state" / "partial").write_bytes(b"\0" * 10)
  assert RunCheckpointer(str(tmp_path)).latest_step() == 5
  result = trainer.train_and_evaluate(small_config(steps=7, eval_every=0), str(tmp_path))
  assert result.step == 7


def test_early_stopping_after_patience_evals(tmp_path):
  c = small_config(steps=40, eval_every=2, patience=2)
  c.opt.update(lr=5.0, schedule="constant", clip_norm=0.0)  # diverges, so evals stop improving
  result = trainer.train_and_evaluate(c, str(tmp_path))
  assert result.stopped_early and result.step < 40
  evals = [l for _, l in result.eval_history]
  best = min(range(len(evals)), key=evals.__getitem__)
  assert len(evals) - 1 - best == 2


def test_batch_not_divisible_by_data_shards_is_refused(tmp_path):
  c = small_config()
  c.opt.grad_accum = 3
  with pytest.raises(ValueError, match="batch_size=8 is not divisible by opt.grad_accum=3"):
    trainer.train_and_evaluate(c, str(tmp_path))


def test_cli_names_unknown_override_fields():
  from jaxlm.train import unknown_overrides
  bad = unknown_overrides(["--config", TINY, "--config.model.n_hidden=3", "--config.train.steps=5",
                           "--config.optim.lr=1"])
  assert len(bad) == 2
  assert bad[0].startswith("model.n_hidden (known fields there: ") and "d_model" in bad[0]
  assert bad[1].startswith("optim (known fields there: data, mesh, model, opt, train)")


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  out = subprocess.run([sys.executable, "-m", "jaxlm.train", "--config", TINY, "--workdir", str(tmp_path / "w"),
                        f"--config.data.corpus={empty}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1].startswith("error: ") and str(empty) in out.stderr
  assert "Traceback" not in out.stderr


def test_the_loop_dispatches_at_most_two_steps_ahead_of_the_devices(tmp_path, monkeypatch):
  """Unbounded, a run that logs rarely queued every step, and an evaluation every batch of the split, and XLA:CPU's
  collectives deadlocked on 2 devices (trainer.MAX_STEPS_AHEAD). Counted: the programs dispatched and not yet run
  when each train step and each evaluation batch is dispatched; the control, with the bound lifted, shows that
  this model's programs do pile up."""
  def most_pending(name):
    c = small_config(model=dict(d_model=128, d_ff=512, n_heads=4), steps=16, seq_len=16, batch_size=32,
                     log_every=1000, eval_every=16, save_every=1000, eval_batch_size=2)
    c.data.eval_batches = 0  # the whole split: hundreds of 2-row batches
    run = trainer.Trainer(c, str(tmp_path / name))
    counts = {"train": [], "eval": []}

    def counting(kind, dispatch, pending):
      def call(*args):
        pending[:] = [x for x in pending if not x.is_ready()]
        counts[kind].append(len(pending))
        out = dispatch(*args)
        pending.append(out[1]["loss"] if kind == "train" else out)
        return out
      return call

    run.step_fn = counting("train", run.step_fn, [])
    run.eval_fn = counting("eval", run.eval_fn, [])
    try:
      run.run()
    finally:
      run.close()
    assert len(counts["eval"]) > 100, len(counts["eval"])
    return max(counts["train"]), max(counts["eval"])

  bound = trainer.MAX_STEPS_AHEAD
  assert max(most_pending("bounded")) <= bound
  monkeypatch.setattr(trainer, "MAX_STEPS_AHEAD", 10 ** 6)
  train, evaluation = most_pending("unbounded")
  assert train > bound + 2 and evaluation > bound + 2, (train, evaluation)
