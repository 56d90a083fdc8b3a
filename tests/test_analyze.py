"""python -m jaxlm.analyze: quality scores on hand-made texts, status of a model directory, reasoning traces that
replay the model's own ACT (tiny random HRM / HRM-Text1 models, no training)."""
import json

import numpy as np
import pytest

from jaxlm import modeldir
from jaxlm.analyze import __main__ as cli
from jaxlm.analyze import quality, reasoning, status
from jaxlm.models import build_model
from small_models import random_params

# Worked by hand from the definitions in jaxlm/analyze/quality.py's docstring.
KNOWN = {
    # 17 letters, 5 spaces, 1 punct of 23: (97.83 + 66.30 + 93.48) / 3; 4 of 6 words formed (cat, mat are short);
    # one sentence with article + verb + >2 words; ttr 5/6 -> 100, length variance 0.139 -> 1.39; 4 distinct 3-grams.
    "The cat was on the mat.": dict(character_coherence=86, word_formation=67, sentence_structure=60,
                                    semantic_meaning=0, token_diversity=51, repetition=100, overall=53),
    # no punctuation (50), short unknown words, 3 identical 3-grams, ttr 0.2 -> 30, no length variance.
    "la la la la la": dict(character_coherence=58, word_formation=0, sentence_structure=10, semantic_meaning=0,
                           token_diversity=15, repetition=33, overall=17),
    # The original matches phrases as substrings: "she was" also contains "he was" (2 x 15), plus one window (+5).
    "She was here.": dict(character_coherence=89, word_formation=100, sentence_structure=40, semantic_meaning=35,
                          token_diversity=51, repetition=100, overall=63),
    # a malformed word (> 8 characters, not all letters) costs 5 of word formation's 100.
    "abc123def4 the": dict(character_coherence=63, word_formation=95, sentence_structure=20, semantic_meaning=0,
                           token_diversity=100, repetition=100, overall=56),
    "": dict(character_coherence=0, word_formation=0, sentence_structure=0, semantic_meaning=0, token_diversity=0,
             repetition=0, overall=0),
}
HRM = dict(arch="hrm", family="hrm", vocab_size=32, d_model=16, n_heads=2, l_layers=1, h_layers=1, mlp_multiple=16,
           halt_max_steps=2, q_head_pool="mean", act_batch_halt=True, causal=False, norm_position="post",
           max_seq_len=16)
HRM_TEXT1 = dict(arch="hrm_text1", vocab_size=32, d_model=16, n_heads=2, n_layers=2, d_ff=32, halt_max_steps=3,
                 max_seq_len=16)


@pytest.mark.parametrize("text", list(KNOWN))
def test_quality_scores_of_hand_made_texts(text):
  assert quality.scores(text) == KNOWN[text]


def test_word_list_is_the_originals():
  words = quality.load_word_list()
  assert len(words) == 105 and {"the", "eat", "hands"} <= words and "cat" not in words


@pytest.fixture(scope="module")
def hrm_dir(tmp_path_factory):
  return modeldir.save_model_dir(str(tmp_path_factory.mktemp("a") / "hrm"), HRM, random_params(HRM),
                                 {"kind": "char", "chars": [chr(97 + i) for i in range(26)] + list(" .,!?'")})


def test_status_reports_parameters_vocabulary_and_flags(hrm_dir, capsys):
  info = status.status(hrm_dir)
  n_params = sum(int(np.prod(s)) for s in modeldir.expected_param_shapes(HRM).values())
  assert info["parameters"] == n_params and info["family"] == "hrm"
  assert info["tokenizer"] == {"kind": "char", "size": 32} and info["vocab_size"] == 32
  assert info["compatibility"]["causal"] == {"value": False, "original": False}
  assert cli.main(["status", "--checkpoint", hrm_dir]) == 0
  out = capsys.readouterr().out
  assert f"{n_params:,} parameters" in out and "causal: False = original" in out


def test_hrm_trace_replays_act(hrm_dir):
  """The step-by-step replay ends in the states the model's own ACT returns, after the segments ACT ran."""
  config, module = build_model(HRM)
  params = random_params(HRM)
  ids = [3, 1, 4, 1, 5, 9, 2, 6]
  for n, t in ((2, 3),):
    trace = reasoning.hrm_trace(config, module, params, ids, n, t)
    act = module.apply({"params": params}, np.asarray([ids]), n_cycles=n, t_steps=t, method=module.act)
    assert trace["segments"] == int(np.max(act["steps"])) and 1 <= trace["segments"] <= 2
    assert len(trace["l_norms"]) == trace["segments"] * n * t and len(trace["h_norms"]) == trace["segments"] * n
    np.testing.assert_allclose(trace["l_norms"][-1], np.linalg.norm(act["z_L"]), rtol=1e-5)
    np.testing.assert_allclose(trace["h_norms"][-1], np.linalg.norm(act["z_H"]), rtol=1e-5)
    margin = np.asarray(act["q_logits"])[..., 0] - np.asarray(act["q_logits"])[..., 1]
    np.testing.assert_allclose(trace["halt_margin"][-1], margin.reshape(-1), rtol=1e-5, atol=1e-6)


def test_reasoning_cli_prints_and_plots(hrm_dir, tmp_path, capsys):
  png, js = tmp_path / "r.png", tmp_path / "r.json"
  assert cli.main(["reasoning", "--checkpoint", hrm_dir, "--prompt", "the cat", "--mode", "deep",
                   "--plot", str(png), "--json", str(js)]) == 0
  out = capsys.readouterr().out
  assert "mode deep (N=3 cycles x T=2 steps)" in out and "ACT steps per position" in out
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and set(json.loads(js.read_text())) == {"deep"}


def test_hrm_text1_trace_matches_ponder():
  config, module = build_model(HRM_TEXT1)
  params = random_params(HRM_TEXT1)
  trace = reasoning.hrm_text1_trace(module, params, [1, 2, 3, 4])
  probs = np.asarray(trace["halt_probs"])
  assert probs.shape == (2, 3, 4) and np.all((probs >= 0) & (probs <= 1))
  # No early exit at these probabilities: expected updates = sum over layers of rem_1 + rem_2, rem_s the mass left
  # after s halt reads.
  rem1 = 1 - probs[:, 0]
  np.testing.assert_allclose(trace["expected_updates"], np.sum(rem1 + rem1 * (1 - probs[:, 1]), axis=0), rtol=1e-5)


def test_quality_cli_on_a_file_and_a_model(hrm_dir, tmp_path, capsys):
  text = tmp_path / "t.txt"
  text.write_text("The cat was on the mat.")
  assert cli.main(["quality", "--text", str(text)]) == 0
  assert "character_coherence 86" in capsys.readouterr().out
  assert cli.main(["quality", "--checkpoint", hrm_dir, "--samples", "2", "--max-new-tokens", "8"]) == 0
  out = capsys.readouterr().out
  assert out.count("sample ") == 2 and "mean: character_coherence" in out
