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
