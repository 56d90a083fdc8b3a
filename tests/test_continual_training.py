"""Issue 13 items 9, 4 (automatic growth) and 5: generation defaults, samples during training, depth growth
during training, the continue/fresh choice and Ctrl-C's pause/stop."""
import json
import os

import numpy as np
import pytest

from jaxlm import gen_defaults


def test_family_generation_defaults_and_flags_override():
  stored = gen_defaults.from_config({"model": {"family": "yinggem"}})  # written before they were stored
  assert stored["repetition_penalty"] == 1.2 and stored["penalty_style"] == "divide"
  builtin = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "penalty_style": "sign",
             "max_new_tokens": 100, "repeat_stop": 0}
  chosen = gen_defaults.resolve({"temperature": 0.0, "top_k": None}, stored, builtin)
  assert chosen["temperature"] == 0.0 and chosen["repetition_penalty"] == 1.2 and chosen["max_new_tokens"] == 100
  hrm = gen_defaults.resolve({}, gen_defaults.from_config({"generation": gen_defaults.for_family("hrm")}), builtin)
  assert (hrm["top_k"], hrm["repeat_stop"], hrm["temperature"]) == (50, 10, 0.8)
  # HRM-Text1: its generation_config.json's sampling fields win over the chat_with_model values
  t1 = gen_defaults.for_family("hrm_text1", {"_from_model_config": True, "top_k": 20, "do_sample": False})
  assert (t1["top_k"], t1["temperature"], t1["max_new_tokens"]) == (20, 0.0, 100)
  assert gen_defaults.from_config({"model": {"family": "hrom"}}) == {}


def test_repeat_stop_asks_after_more_than_n_equal_tokens():
  stop = gen_defaults.repeat_stopper(3)
  asked = [bool(stop(np.array([t, 1]), i, np.zeros(2, bool))[0]) for i, t in enumerate([5, 7, 7, 7, 7, 8])]
  assert asked == [False, False, False, False, True, False]
  assert gen_defaults.repeat_stopper(0) is None


@pytest.mark.slow
def test_growth_during_training_keeps_the_loss_and_samples_are_logged(tmp_path):
  """128 characters a step: growth after step 2; step 3's loss (computed before its update) equals the loss of
  the same run without growth, and the optimizer state of the old parameters is kept."""
  from jaxlm import trainer
  from jaxlm.metrics import read_metrics
  from tests.test_train import small_config

  def run(workdir, **train):
    c = small_config(steps=4, eval_every=0, save_every=4, log_every=1, **train)
    c.model.update(dropout=0.0, attention_dropout=0.0)
    trainer.train_and_evaluate(c, str(workdir))
    rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, rows

  plain, _ = run(tmp_path / "plain")
  grown, rows = run(tmp_path / "grown", grow_every_chars=256, sample_every=2, sample_tokens=4)
  assert grown[1] == plain[1] and grown[2] == plain[2]
  np.testing.assert_allclose(grown[3], plain[3], rtol=1e-6)  # the first step of the grown model
  assert [r["step"] for r in rows if "sample" in r] == [2] and isinstance(rows[-1].get("sample", ""), str)
  config = json.loads((tmp_path / "grown" / "config.json").read_text())
  assert config["model"]["n_layers"] == 3
  (growth,) = [e for e in config["history"][-1]["events"] if e["kind"] == "layers"]
  assert growth["step"] == 2 and growth["chars"] == 256 and growth["optimizer"] == "kept"
  assert growth["params_after"] > growth["params_before"]


CHOICE_SCRIPT = """
import sys
from jaxlm import start_choice
history = [{"corpus": "alice", "vocab_size": 87, "params": 1000, "finished": "2025-01-01T00:00:00+00:00"}]
print("ANSWER", start_choice.at_start("ask", "shakespeare", "/m", history, 87, 1000, primary=True, out=sys.stdout))
print("ANSWER", start_choice.at_start("ask", "alice", "/m", history, 87, 1000, primary=True, out=sys.stdout))
print("ANSWER", start_choice.after_interrupt(primary=True, out=sys.stdout))
"""


def _run_in_pty(script, typed):
  """Runs `script` with a pseudo-terminal as stdin/stdout, typing `typed`; returns everything it printed."""
  import pty
  import subprocess
  import sys
  import time
  leader, follower = pty.openpty()
  env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
  proc = subprocess.Popen([sys.executable, "-c", script], stdin=follower, stdout=follower, stderr=follower, env=env)
  os.close(follower)
  out = b""
  deadline = time.time() + 60
  pending = list(typed)
  while time.time() < deadline:
    import select
    ready, _, _ = select.select([leader], [], [], 0.2)
    if ready:
      try:
        chunk = os.read(leader, 4096)
      except OSError:
        break
      if not chunk:
        break
      out += chunk
      if pending and out.rstrip().endswith(b">"):
        os.write(leader, pending.pop(0).encode() + b"\n")
    elif proc.poll() is not None:
      break
  proc.wait(timeout=10)
  os.close(leader)
  return out.decode(errors="replace")


def test_choices_on_a_terminal_and_without_one():
  out = _run_in_pty(CHOICE_SCRIPT, ["f", "s"])
  assert "datasets trained: alice" in out and "vocabulary: 87 tokens" in out and "parameters: 1,000" in out
  assert "last update: 2025-01-01T00:00:00+00:00" in out and "has not seen 'shakespeare'" in out
  assert [l.split()[1] for l in out.splitlines() if l.startswith("ANSWER")] == ["fresh", "continue", "stop"]
  import subprocess
  import sys
  piped = subprocess.run([sys.executable, "-c", CHOICE_SCRIPT], input="fresh\nstop\n", capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.path.dirname(
                             os.path.dirname(os.path.abspath(__file__)))})
  assert [l.split()[1] for l in piped.stdout.splitlines() if l.startswith("ANSWER")] == ["continue", "continue",
                                                                                           "pause"]
  assert "datasets trained" not in piped.stdout  # nothing asked, nothing read


def test_flags_answer_without_asking():
  from jaxlm import start_choice
  history = [{"corpus": "alice"}]
  assert start_choice.at_start("fresh", "shakespeare", "/m", history, 87, 10, primary=True) == "fresh"
  assert start_choice.at_start("fresh", "alice", "/m", history, 87, 10, primary=True) == "continue"  # not new
  with pytest.raises(ValueError, match="train.on_new_corpus must be one of continue, fresh, ask"):
    start_choice.at_start("maybe", "alice", "/m", history, 87, 10, primary=True)
