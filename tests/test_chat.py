"""jaxlm.chat driven through a pipe, its dialogue history, and the safety filter applied to input and replies (the
filter's own matching rules: test_safety.py)."""
import io
import os
import signal
import string
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util

from jaxlm import chat, generate, modeldir

CHARS = sorted(set(" !.,?'<>/" + string.ascii_letters + string.digits))
# After "<assistant>" the model says " ok.</s>": a bigram chain; every other character leads to " ".
CHAIN = {">": " ", " ": "o", "o": "k", "k": ".", ".": "<", "<": "/", "/": "s", "s": ">"}


def bigram_model_dir(path, family="hrom"):
  """A 1-layer char model whose attention and MLP add nothing: the next character depends on the last one."""
  v, d = len(CHARS), 80
  model = dict(arch="decoder", family=family, vocab_size=v, d_model=d, n_layers=1, n_heads=2, d_ff=16, norm="rms",
               causal=True, max_seq_len=64)
  params = {k: np.zeros(shape, np.float32) for k, shape in modeldir.expected_param_shapes(model).items()}
  for key in params:
    if key.endswith("scale"):
      params[key][:] = 1.0
  params["embed/embedding"] = 4.0 * np.eye(v, d, dtype=np.float32)
  for i, c in enumerate(CHARS):
    params["head/kernel"][i, CHARS.index(CHAIN.get(c, " "))] = 10.0
  return modeldir.save_model_dir(str(path), model, traverse_util.unflatten_dict(params, sep="/"),
                                 tokenizer_json={"kind": "char", "chars": CHARS})


@pytest.fixture(scope="module")
def dialogue_dir(tmp_path_factory):
  return bigram_model_dir(tmp_path_factory.mktemp("chat") / "bigram")


def test_chat_session_through_a_pipe(dialogue_dir):
  session = "\n".join([
      "hello there", "status", "mode deep", "I want to kill time", "temp 0", "batch", "how are you?", "natural",
      "top_p 0.5", "quit", "never read"]) + "\n"
  result = subprocess.run([sys.executable, "-m", "jaxlm.chat", "--checkpoint", dialogue_dir, "--max-new-tokens", "12"],
                          input=session, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert out.count("model> ok.\n") == 2                     # interactive, then batch
  assert "[blocked: your message contains 'kill', which is on the blocklist; it was not sent]" in out
  assert "model: hrom (arch decoder)" in out and "parameters: " in out
  assert f"vocabulary: {len(CHARS)} tokens, tokenizer char" in out and "datasets trained:" in out
  assert "settings: mode normal (no effect on this model), temperature 0.8, top_p 0.9" in out
  assert "[mode deep: no effect on this model" in out
  assert "| mode normal | temp 0.8]" in out and "| mode deep | temp 0]" in out and "tokens/s" in out
  assert "[natural on: replies stop at a sentence end]" in out and "[top_p 0.5]" in out
  assert out.rstrip().endswith("[bye]") and "never read" not in out


def run_chat(argv, lines):
  out = io.StringIO()
  assert chat.main(argv, stdin=io.StringIO("\n".join(lines) + "\n"), stdout=out) == 0
  return out.getvalue()


def test_a_blocked_word_in_the_reply_stops_it_unseen(dialogue_dir, tmp_path):
  blocklist = tmp_path / "blocklist.txt"
  blocklist.write_text("# my list\nOK\n")
  out = run_chat(["--checkpoint", dialogue_dir, "--blocklist", str(blocklist), "--temperature", "0"],
                 ["hi", "status"])
  assert "model> \n[reply stopped: it contained 'ok', which is on the blocklist]" in out
  assert f"safety: 1 blocked words/phrases from {blocklist}" in out
  assert "history: 1 turn(s)" in out


def test_plain_models_continue_the_text(tmp_path):
  model_dir = bigram_model_dir(tmp_path / "plain", family="optimus_prime")
  out = run_chat(["--checkpoint", model_dir, "--temperature", "0", "--max-new-tokens", "6", "--no-safety"],
                 ["hi", "reset", "unlimited", "natural", "hi"])
  assert "plain format" in out
  assert out.count("model>  ok.</\n") == 1                 # 6 tokens of " ok.</s>" ...
  assert "[unlimited on: up to 4096 tokens]" in out
  assert out.count("model>  ok.\n") == 1                   # natural: ends at the sentence end


def test_dialogue_history_drops_the_oldest_turns_first(dialogue_dir):
  model = generate.load(dialogue_dir)
  fmt = chat.DialogueFormat(model.tokenizer)
  enc = model.tokenizer.encode
  history = [(fmt.encode_message(f"question {i}", False), fmt.encode_reply(f"answer {i}")) for i in range(5)]
  prompt = fmt.prompt(history, fmt.encode_message("last", False), budget=80)
  text = model.tokenizer.decode(prompt)
  assert len(prompt) <= 80 and text.startswith("<s><user> question 4</s><assistant> answer 4</s>")
  assert text.endswith("<user> last</s><assistant>")
  assert fmt.prompt([], enc(" x"), budget=200) == enc("<s><user> x</s><assistant>")
  assert fmt.stop_text == "</s>"


# ------------------------------------------------------------------------------ ending: EOF, Ctrl-C, bad values
@pytest.mark.parametrize("flag,value,message", [
    ("--max-new-tokens", "0", "--max-new-tokens=0: must be an integer in [1, 16777215]"),
    ("--temperature", "-0.5", "--temperature=-0.5: must be a number >= 0 (0 = greedy)"),
    ("--top-p", "2", "--top-p=2.0: must be a number in [0, 1]"),
    ("--context", "1", "--context=1: must be 0 (model.max_seq_len) or an integer in [2, 16777216]"),
])
def test_out_of_range_values_are_refused_before_loading(tmp_path, capsys, monkeypatch, flag, value, message):
  monkeypatch.delenv("JAXLM_VERBOSE", raising=False)
  out = io.StringIO()
  assert chat.main(["--checkpoint", str(tmp_path / "missing"), flag, value], stdin=io.StringIO(""), stdout=out) == 2
  assert capsys.readouterr().err.startswith(f"error: {message}") and out.getvalue() == ""


class CtrlCAfter:
  """Piped input whose reader gets Ctrl-C after the given lines."""

  def __init__(self, lines):
    self.lines = lines

  def __iter__(self):
    yield from (line + "\n" for line in self.lines)
    raise KeyboardInterrupt


def test_end_of_input_and_ctrl_c_at_the_prompt_end_the_chat(dialogue_dir, capsys):
  assert run_chat(["--checkpoint", dialogue_dir], ["status"]).rstrip().endswith("history: 0 turn(s)\n[bye]")
  out = io.StringIO()
  assert chat.main(["--checkpoint", dialogue_dir], stdin=CtrlCAfter(["status"]), stdout=out) == 0
  assert out.getvalue().endswith("history: 0 turn(s)\n\n[bye]\n")
  assert "Traceback" not in capsys.readouterr().err


def test_ctrl_c_during_a_reply_stops_only_that_reply(dialogue_dir, monkeypatch):
  """Ctrl-C while the model answers: the reply stops, the chat goes on (the next line is read)."""
  on_tokens = chat._Reply.on_tokens

  def press_ctrl_c_at_the_first_token(self, tokens, step, finished):
    if step == 0:
      os.kill(os.getpid(), signal.SIGINT)
    return on_tokens(self, tokens, step, finished)
  monkeypatch.setattr(chat._Reply, "on_tokens", press_ctrl_c_at_the_first_token)
  out = run_chat(["--checkpoint", dialogue_dir, "--temperature", "0", "--max-new-tokens", "40"], ["hi", "status"])
  assert "[reply stopped: interrupted]" in out and "model> ok." not in out  # " ok." is 4 tokens
  assert "history: 1 turn(s)" in out and out.rstrip().endswith("[bye]")
