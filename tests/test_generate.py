"""jaxlm.generate: the originals' greedy tokens, KV cache == full recompute, sampling, stop ids, streaming, CLI."""
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from convert import api
from jaxlm import generate, kv_cache, modeldir, sampling
from jaxlm.models import build_model
from jaxlm.sampling import Sampling

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CHECKPOINTS = {"yinggem": "yinggem_best.pth", "optimus_prime": "best_model.pt",
               "hrom": "hrom_20261125_133958_step0.pt", "hrm": "hrm_continual_learning.pt", "hrm_text1": ""}


TWINS = ("untrained", "perturbed")


def folder(family, twin):
  """The fixture folder, or its perturbed twin (trained-like weights made by the original code)."""
  return os.path.join(FIXTURES, family, *(("perturbed",) if twin == "perturbed" else ()))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """family -> model directory of the untrained fixture, and (family, twin) -> that twin's."""
  root = tmp_path_factory.mktemp("generate")
  out = {(family, twin): api.torch2jax(os.path.join(folder(family, twin), name), str(root / f"{family}_{twin}"),
                                       family=family)
         for family, name in CHECKPOINTS.items() for twin in TWINS}
  out.update({family: out[family, "untrained"] for family in CHECKPOINTS})
  return out


def fixture_prompt(family, twin="untrained"):
  return np.load(os.path.join(folder(family, twin), "input_ids.npy"))[0, :8].tolist()


def run_cli(capsys, argv):
  assert generate.main(argv) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  return [int(t) for t in lines[-1].split()]


# The HROM and YingGem perturbed twins have no greedy files. Their greedy tokens were computed by the independent
# torch re-implementations of the originals in tests/test_convert_families.py (`reference_greedy`: the perturbed
# checkpoint loaded strictly, a full forward per token, argmax; YingGem's penalty divides each seen token's logit
# once per occurrence, as its generate does); test_references_reproduce_the_fixture_logits there checks that those
# references reproduce both twins' fixture logits bit for bit and the untrained twins' greedy files, and that they
# still give these lists. Smallest top-1/top-2 logit gap along each path (float32 rounding is ~1e-7): hrom 0.025
# of max|logit| 1.2, yinggem 0.15 of 0.9, yinggem with penalty 1.2 0.0020. No </s> (id 2, where HROM stops) occurs.
REFERENCE_GREEDY = {
    ("hrom", 1.0): [43] + [21] * 15,
    ("yinggem", 1.0): [142] * 16,
    ("yinggem", 1.2): [142, 142, 235, 109, 120, 142, 235, 109, 13, 120, 52, 96, 227, 28, 101, 142],
}


PENALTY = ["--repetition-penalty", "1.2", "--penalty-style", "divide"]
NO_PENALTY = ["--repetition-penalty", "1"]  # YingGem models default to the original's 1.2


@pytest.mark.parametrize("family,twin,expected,extra", [
    ("yinggem", "untrained", "generate/yinggem_greedy_tokens.npy", NO_PENALTY),
    ("yinggem", "untrained", "generate/yinggem_greedy_tokens_reppen1.2.npy", []),  # the stored default: 1.2, divide
    ("yinggem", "perturbed", ("reference", 1.0), NO_PENALTY),
    ("yinggem", "perturbed", ("reference", 1.2), PENALTY),
    ("optimus_prime", "untrained", "generate/optimus_prime_greedy_tokens_full_recompute.npy", []),
    ("optimus_prime", "perturbed", "optimus_prime/perturbed/greedy_tokens_full_recompute.npy", []),
    ("hrom", "untrained", "generate/hrom_greedy_tokens.npy", []),
    ("hrom", "perturbed", ("reference", 1.0), []),
    ("hrm", "untrained", "hrm/greedy_tokens.npy", ["--mode", "normal", "--repeat-stop", "0"]),  # N=2, T=2 with ACT, as the original chat
    ("hrm", "perturbed", "hrm/perturbed/greedy_tokens.npy", ["--mode", "normal", "--repeat-stop", "0"]),  # each forward halts after 1
    ("hrm_text1", "untrained", "hrm_text1/greedy_tokens.npy", []),        # with pondering
    ("hrm_text1", "perturbed", "hrm_text1/perturbed/greedy_tokens.npy", []),  # layer 0 exits early
], ids=["yinggem-untrained", "yinggem-untrained-reppen1.2", "yinggem-perturbed", "yinggem-perturbed-reppen1.2",
        "optimus_prime-untrained", "optimus_prime-perturbed", "hrom-untrained", "hrom-perturbed", "hrm-untrained",
        "hrm-perturbed", "hrm_text1-untrained", "hrm_text1-perturbed"])
def test_greedy_tokens_equal_the_originals(converted, capsys, family, twin, expected, extra):
  if isinstance(expected, str):
    want = np.load(os.path.join(FIXTURES, expected)).tolist()
  else:
    want = REFERENCE_GREEDY[family, expected[1]]
  ids = ",".join(map(str, fixture_prompt(family, twin)))
  tokens = run_cli(capsys, ["--checkpoint", converted[family, twin], "--prompt-ids", ids, "--max-new-tokens", "16",
                            "--temperature", "0", "--print-ids", "--stop-ids", "none"] + extra)
  assert tokens == want


def test_hrm_reasoning_mode_changes_the_computation(converted, capsys):
  """How the CLI picks N and T does not depend on the weights: the untrained fixture only (the perturbed twin's
  normal-mode greedy tokens are checked above)."""
  argv = ["--checkpoint", converted["hrm"], "--prompt-ids", ",".join(map(str, fixture_prompt("hrm"))),
          "--max-new-tokens", "16", "--temperature", "0", "--print-ids", "--stop-ids", "none"]
  normal = np.load(os.path.join(FIXTURES, "hrm", "greedy_tokens.npy")).tolist()
  assert run_cli(capsys, argv + ["--n-cycles", "1", "--t-steps", "1"]) != normal
  assert run_cli(capsys, argv + ["--mode", "fast", "--n-cycles", "2", "--t-steps", "2"]) == normal  # explicit N, T win


def test_strategy_follows_the_config(converted):
  """Non-causal originals (YingGem, HRM) and models without a cache layout recompute; causal decoders cache."""
  strategies = {f: generate.Generator(*generate.load(converted[f])[1:3]).strategy for f in CHECKPOINTS}
  assert strategies == {"yinggem": "recompute", "optimus_prime": "cache", "hrom": "cache", "hrm": "recompute",
                        "hrm_text1": "recompute"}
  model = generate.load(converted["yinggem"])
  with pytest.raises(ValueError, match="cannot decode with a KV cache"):
    generate.Generator(model.module, model.params, strategy="cache")


# ------------------------------------------------------------------------------ cache == recompute
def random_model(seed=0, **overrides):
  """(model dict, numpy params) of a small random GQA decoder."""
  model = dict(arch="decoder", vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
               norm="rms", norm_eps=1e-6, rope_style="interleaved", glu="silu", mlp_bias=True, causal=True,
               max_seq_len=128)
  model.update(overrides)
  rng = np.random.default_rng(seed)
  params = {k: (float(k.endswith("scale")) + 0.3 * rng.standard_normal(shape)).astype(np.float32)
            for k, shape in modeldir.expected_param_shapes(model).items()}
  return model, traverse_util.unflatten_dict(params, sep="/")


def random_decoder(seed=0, **overrides):
  model, params = random_model(seed, **overrides)
  config, module = build_model(model)
  return config, module, jax.tree.map(jnp.asarray, params)


PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 60, 61, 7, 8, 30, 31, 12], [70, 71, 72, 73, 74, 75, 76]]


@pytest.mark.parametrize("overrides", [
    dict(),                                                    # GQA: 4 query heads share 2 kv heads
    dict(attention_window=(4, 0), rope_style="half", norm="layer", attn_bias=True, head_bias=True),
], ids=["gqa", "sliding_window"])
def test_kv_cache_decoding_equals_full_recompute(overrides):
  """Batched prompts of unequal length, decoded far past the window; greedy and sampled tokens agree."""
  _, module, params = random_decoder(**overrides)
  for setting in (Sampling(), Sampling(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3)):
    outs = {s: generate.generate(module, params, PROMPTS, 24, sampling=setting, seed=3, strategy=s)
            for s in ("cache", "recompute")}
    assert outs["cache"].strategy == "cache" and outs["recompute"].strategy == "recompute"
    assert outs["cache"].tokens == outs["recompute"].tokens
    assert all(len(t) == 24 for t in outs["cache"].tokens)
  # Each row of the batch decodes as it would alone.
  alone = generate.generate(module, params, PROMPTS[1:2], 24, seed=3, strategy="cache")
  assert alone.tokens[0] == generate.generate(module, params, PROMPTS, 24, seed=3, strategy="cache").tokens[1]


def test_cached_logits_equal_full_forward_logits():
  """Prefill then one token per step through a 4-slot ring buffer: every step's logits match a full forward."""
  config, module, params = random_decoder(attention_window=4, n_kv_heads=1)
  seq = np.array([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26], [2, 71, 82, 81, 82, 84, 59, 0, 0, 0, 0, 0]])
  lengths = np.array([12, 7])
  full = np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(seq)))
  cache = kv_cache.init_cache(config, 2, 64)
  assert [c.size for c in cache] == [4, 4]  # O(window) memory, whatever the length
  step = jax.jit(lambda p, t, q, c: module.apply({"params": p}, t, positions_BxT=q, cache=c))
  prefill = 5  # longer than the ring buffer: the chunk attends to itself, the buffer keeps its last 4
  pos = np.broadcast_to(np.arange(prefill), (2, prefill))
  logits, cache = step(params, jnp.asarray(seq[:, :prefill]), jnp.asarray(pos), cache)
  np.testing.assert_allclose(np.asarray(logits), full[:, :prefill], atol=1e-5)
  for t in range(prefill, 12):
    logits, cache = step(params, jnp.asarray(seq[:, t:t + 1]), jnp.full((2, 1), t, jnp.int32), cache)
    for row in range(2):
      if t < lengths[row]:
        np.testing.assert_allclose(np.asarray(logits)[row, 0], full[row, t], atol=1e-5)


def test_cache_sizes_gqa_and_window():
  config, _, _ = random_decoder(n_layers=3, attention_window=(8, 0, 8), n_kv_heads=1)
  cache = kv_cache.init_cache(config, batch=2, length=100)
  assert [c.k_BxSxKxH.shape for c in cache] == [(2, 8, 1, 8), (2, 100, 1, 8), (2, 8, 1, 8)]
  with pytest.raises(ValueError, match="cannot use a KV cache"):
    kv_cache.init_cache(config.replace(causal=False), 1, 10)


# ------------------------------------------------------------------------------ stop ids, streaming, trainer
def test_stop_ids_end_each_row_and_the_listener_sees_every_token():
  _, module, params = random_decoder()
  gen = generate.Generator(module, params)
  free = gen.generate(PROMPTS, 12)
  stop = free.tokens[0][4]  # row 0 stops at its 5th token (not included); other rows stop where it appears
  seen = []
  out = gen.generate(PROMPTS, 12, stop_ids=[stop],
                     listener=lambda tokens, step, finished: seen.append((step, tokens.tolist(), finished.tolist())))
  for row, tokens in enumerate(free.tokens):
    cut = tokens.index(stop) if stop in tokens else len(tokens)
    assert out.tokens[row] == tokens[:cut]
    assert out.finish[row] == ("stop" if stop in tokens else "length")
  assert [s for s, _, _ in seen] == list(range(len(seen)))
  assert [t[0] for _, t, _ in seen[:5]] == free.tokens[0][:5]
  # The listener can end rows (chat uses this for the safety filter and Ctrl-C).
  halted = gen.generate(PROMPTS, 12, listener=lambda tokens, step, finished: step >= 2)
  assert [len(t) for t in halted.tokens] == [3, 3, 3] and halted.finish == ["halt"] * 3


def test_trainer_sampler_keeps_its_signature():
  _, module, params = random_decoder()
  new = generate.sample_ids(module, params, [1, 2, 3], 10, context=16, temperature=0.8, seed=1)
  assert len(new) == 10 and all(isinstance(t, int) and 0 <= t < 97 for t in new)
  assert new == generate.sample_ids(module, params, [1, 2, 3], 10, context=16, temperature=0.8, seed=1)
  assert new != generate.sample_ids(module, params, [1, 2, 3], 10, context=16, temperature=0.8, seed=2)


# ------------------------------------------------------------------------------ sampling stages
def test_repetition_penalties():
  logits = jnp.array([[2.0, -2.0, 1.0, -1.0]])
  counts = jnp.array([[2, 2, 0, 1]])
  np.testing.assert_allclose(sampling.penalize(logits, counts, 2.0, "divide"), [[0.5, -0.5, 1.0, -0.5]])
  np.testing.assert_allclose(sampling.penalize(logits, counts, 2.0, "sign"), [[1.0, -4.0, 1.0, -2.0]])
  assert sampling.token_counts([[3, 3, 1]], 4).tolist() == [[0, 1, 0, 2]]


def test_top_k_and_top_p_filters():
  logits = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15]]))
  kept = lambda **kw: np.isfinite(np.asarray(sampling.filter_top(
      logits, jnp.int32(kw.get("k", 0)), jnp.float32(kw.get("p", 1.0)),
      sampling.Stages(greedy=False, top_k="k" in kw, top_p="p" in kw)))[0]).tolist()
  assert kept(k=2) == [True, False, True, False]
  assert kept(p=0.0) == [True, False, False, False]       # p = 0 keeps only the most likely token
  assert kept(p=0.5) == [True, False, True, False]        # mass before 0.3 is 0.5 <= p
  assert kept(p=0.85) == [True, False, True, True]
  assert kept(k=1, p=0.99) == [True, False, False, False]
  with pytest.raises(ValueError, match="top_p"):
    Sampling(top_p=1.5)


# ------------------------------------------------------------------------------ CLI
def test_cli_text_prompt_batch_and_errors(converted, capsys, tmp_path):
  hrom = converted["hrom"]  # an ids tokenizer: its prompt text is ids
  argv = ["--checkpoint", hrom, "--prompt", "1 4 20 30", "--prompt-ids", "1,4,20", "--max-new-tokens", "5",
          "--temperature", "0", "--print-ids", "--stop-ids", "none"]
  assert generate.main(argv) == 0
  captured = capsys.readouterr()
  rows = [list(map(int, line.split())) for line in captured.out.strip().splitlines()[-2:]]
  assert [len(r) for r in rows] == [5, 5]
  assert "tokens/s" in captured.err
  assert generate.main(["--checkpoint", hrom, "--max-new-tokens", "2"]) == 2
  assert "give --prompt" in capsys.readouterr().err
  assert generate.main(["--checkpoint", hrom, "--prompt-ids", "1,999"]) == 2
  assert "outside the vocabulary" in capsys.readouterr().err
  assert generate.main(["--checkpoint", hrom, "--prompt-ids", "1", "--mode", "deep"]) == 2
  assert "apply to HRM models" in capsys.readouterr().err
  assert generate.main(["--checkpoint", str(tmp_path), "--prompt-ids", "1"]) == 2
  assert "not a model directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------ bounds, errors, Ctrl-C
@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
  """A random causal decoder with a 64-token context and no tokenizer (prompts are --prompt-ids)."""
  model, params = random_model(max_seq_len=64)
  return modeldir.save_model_dir(str(tmp_path_factory.mktemp("decoder") / "model"), model, params)


@pytest.fixture
def no_verbose(monkeypatch):
  monkeypatch.delenv("JAXLM_VERBOSE", raising=False)


def cli_error(capsys, argv, code):
  """stderr of a failing `generate.main(argv)`: exit `code`, one line, no traceback."""
  assert generate.main(argv) == code
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  return err


@pytest.mark.parametrize("flag,value,message", [
    ("--max-new-tokens", "0", "--max-new-tokens=0: must be an integer in [1, 16777215]"),
    ("--max-new-tokens", "1000000000", "--max-new-tokens=1000000000: must be an integer in [1, 16777215] "
                                       "(a generation addresses 2^24 positions)"),
    ("--temperature", "-1", "--temperature=-1.0: must be a number >= 0 (0 = greedy)"),
    ("--temperature", "nan", "--temperature=nan: must be a number >= 0"),
    ("--top-p", "1.5", "--top-p=1.5: must be a number in [0, 1]"),
    ("--top-k", "-1", "--top-k=-1: must be an integer >= 0 (0 = off)"),
    ("--repetition-penalty", "0", "--repetition-penalty=0.0: must be a number > 0 (1 = off)"),
    ("--seed", "-1", "--seed=-1: must be an integer in [0, 4294967296)"),
    ("--seed", "4294967296", "--seed=4294967296: must be an integer in [0, 4294967296)"),
    ("--context", "1", "--context=1: must be 0 (model.max_seq_len) or an integer in [2, 16777216]"),
    ("--n-cycles", "0", "--n-cycles=0: must be an integer >= 1"),
])
def test_cli_refuses_out_of_range_values_before_loading(capsys, tmp_path, no_verbose, flag, value, message):
  """The checkpoint does not exist: the value is refused before anything is read."""
  err = cli_error(capsys, ["--checkpoint", str(tmp_path / "missing"), "--prompt-ids", "1", flag, value], 2)
  assert err.startswith(f"error: {message}")


def test_generation_length_is_bounded_before_anything_is_allocated(monkeypatch):
  _, module, params = random_decoder(max_seq_len=64)
  gen = generate.Generator(module, params)

  def no_decode(*args, **kwargs):
    raise RuntimeError("decoding started")
  monkeypatch.setattr(generate, "_decode", no_decode)
  with pytest.raises(ValueError, match=r"^max_new_tokens=16,777,214 with a 3-token prompt passes the last position "
                                       r"a generation addresses \(16,777,216 = 2\^24, prompt included\); lower "
                                       r"--max-new-tokens to at most 16,777,213$"):
    gen.generate([[1, 2, 3]], generate.MAX_POSITIONS - 2)

  monkeypatch.setattr(generate, "memory_budget", lambda: (1_000_000, "a test budget"))
  with pytest.raises(ValueError) as info:
    gen.generate(PROMPTS, 1_000_000)
  assert str(info.value) == (
      "decoding 3 prompt(s) with a 64-token window and room for 1,048,576 new tokens needs about 12.7 MB (output "
      "ids 12.6 MB, attention scores 61.4 KB, KV cache 50.7 KB, logits 1.2 KB), more than the 1.0 MB allowed (a "
      "test budget); lower --max-new-tokens (at most 65,536 fit), --context or the number of prompts")
  with pytest.raises(RuntimeError, match="decoding started"):  # what it says fits does
    gen.generate(PROMPTS, 65_536)
  monkeypatch.setattr(generate, "memory_budget", lambda: (1000, "a test budget"))
  with pytest.raises(ValueError, match=r"lower --context or the number of prompts \(even 16 new tokens do not fit\)"):
    gen.generate(PROMPTS, 16)


@pytest.mark.parametrize("strategy", ["cache", "recompute"])
def test_long_generations_past_the_context_still_run(strategy):
  """2000 tokens from a RoPE model with a 64-token context: the cache ring and the recompute window slide."""
  _, module, params = random_decoder(max_seq_len=64, attention_window=(16, 0))
  out = generate.generate(module, params, PROMPTS[:2], 2000, strategy=strategy, seed=1,
                          sampling=Sampling(temperature=0.8))
  assert out.finish == ["length", "length"] and [len(t) for t in out.tokens] == [2000, 2000]


def test_cli_position_bound_and_file_system_errors(decoder_dir, capsys, monkeypatch, no_verbose,
                                                    unreadable_config):
  argv = ["--checkpoint", decoder_dir, "--prompt-ids", "1,2,3,4,5", "--stop-ids", "none"]
  err = cli_error(capsys, argv + ["--max-new-tokens", "16777215"], 2)
  assert "lower --max-new-tokens to at most 16,777,211" in err
  config_json = unreadable_config(decoder_dir)
  assert cli_error(capsys, argv, 1) == f"error: {config_json}: permission denied\n"
  assert generate.main(argv + ["--verbose"]) == 1
  err = capsys.readouterr().err
  assert "Traceback (most recent call last)" in err and err.endswith(f"error: {config_json}: permission denied\n")


@pytest.mark.parametrize("stream", [False, True], ids=["batch", "stream"])
def test_ctrl_c_stops_a_long_generation_with_exit_130(decoder_dir, capsys, monkeypatch, no_verbose, stream):
  """Ctrl-C pressed once the loop runs (the main thread waits inside XLA) ends it within a few tokens: 10M
  tokens would take minutes. No traceback, and no runtime error from the streaming callback."""
  check, pressed = generate.StopOnInterrupt.__call__, []

  def press_ctrl_c_once_decoding(self):  # the loop's first stop check
    if not pressed:
      pressed.append(os.kill(os.getpid(), signal.SIGINT))
    return check(self)
  monkeypatch.setattr(generate.StopOnInterrupt, "__call__", press_ctrl_c_once_decoding)
  started = time.perf_counter()
  argv = ["--checkpoint", decoder_dir, "--prompt-ids", "1,2,3", "--max-new-tokens", "10000000", "--stop-ids", "none",
          "--stream" if stream else "--no-stream"]
  assert generate.main(argv) == 130
  assert pressed and time.perf_counter() - started < 60
  err = capsys.readouterr().err
  assert err.endswith("error: aborted (Ctrl-C)\n") and "Traceback" not in err
