"""torch2jax / jax2torch for the HRM text model against the original's reference fixture.

tests/fixtures/hrm/ was made with the original, unmodified HierarchicalReasoningModel (see
../shared/reference/hrm/README.md): an untrained checkpoint in the trainer's layout plus its tokenizer json,
and the original's outputs. Its perturbed twin (tests/fixtures/hrm/perturbed/, also made by the original code):
trained-like weights with norm scales away from 1 and a Q-head that halts the batch after 2 of 4 segments while
its rows disagree; every fixture test runs on both. `OriginalHRM` below is an independent torch re-implementation
of the original forward pass written from SPEC.md, used to check that exports of other models (with perturbed
parameters) load with strict key matching and compute what jaxlm computes.
"""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from convert import api, torchfile  # noqa: E402
from convert import hrm as hrm_convert  # noqa: E402
from convert.__main__ import main as convert_main  # noqa: E402
from convert.errors import ConversionError  # noqa: E402
from jaxlm import modeldir  # noqa: E402
from jaxlm.data import tokenizers  # noqa: E402
from jaxlm.models import build_model  # noqa: E402
from checkpoint_compare import assert_identical  # noqa: E402
from fixture_tolerance import assert_logits_close  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hrm")
TWINS = ("untrained", "perturbed")
FOLDERS = {"untrained": FIXTURES, "perturbed": os.path.join(FIXTURES, "perturbed")}
CHECKPOINT = os.path.join(FIXTURES, "hrm_continual_learning.pt")


def fixture(name, twin="untrained"):
  return np.load(os.path.join(FOLDERS[twin], name))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """twin -> model directory converted by the CLI from that twin's checkpoint."""
  out = {}
  for twin in TWINS:
    out[twin] = str(tmp_path_factory.mktemp("hrm") / twin)
    src = os.path.join(FOLDERS[twin], "hrm_continual_learning.pt")
    assert convert_main(["torch2jax", "--family", "hrm", "--src", src, "--out", out[twin]]) == 0
  return out


@pytest.fixture(scope="module")
def loaded(converted):
  """twin -> (module, params)."""
  return {twin: modeldir.load_model_dir(path)[1:3] for twin, path in converted.items()}


def _act(module, params, ids, mask=None):
  return jax.jit(lambda p, t, m: module.apply({"params": p}, t, padding_mask_BxT=m, method="act"))(
      params, jnp.asarray(ids), None if mask is None else jnp.asarray(mask))


# ------------------------------------------------------------------------------------------ fixture outputs
# Relative to the largest |logit| (|q| for q_logits). Measured max abs error / max|logit|:
#   ACT logits    untrained 3.5e-5 / 3.84 = 9.0e-6   perturbed 2.3e-6 / 3.68 = 6.2e-7
#   single pass   untrained 3.0e-6 / 3.73 = 8.0e-7   perturbed 2.0e-6 / 3.57 = 5.7e-7
#   q_logits      untrained 0 (a zero Q-head: q = its bias)    perturbed 1.9e-6 / 3.94 = 4.8e-7
# The untrained ACT runs all 4 segments of 4 L and 2 H updates, which amplify float32 rounding about 3x per
# segment (a float64 NumPy re-implementation puts torch at 5.6e-6 and jaxlm at 3.9e-5 from the exact values); the
# perturbed one halts after 2. What the bugs to catch cost (relative, smaller twin): RoPE base x1.3 2e-2, 10x
# RMSNorm eps 4.2e-5, pre-norm blocks 21, swapped norm weights (perturbed) 0.9.
TOLERANCE = {"untrained": dict(act=3e-5, single=3e-6, q=1e-6), "perturbed": dict(act=3e-6, single=3e-6, q=2.5e-6)}


@pytest.mark.parametrize("twin", TWINS)
def test_reproduces_the_original_outputs(loaded, twin):
  module, params = loaded[twin]
  tol = TOLERANCE[twin]
  ids = fixture("input_ids.npy", twin)
  out = _act(module, params, ids)  # normal mode (2 x 2), up to halt_max_steps = 4 segments
  single = jax.jit(lambda p, t: module.apply({"params": p}, t, method="single_pass"))(params, jnp.asarray(ids))
  print(f"\nhrm {twin}: steps {np.asarray(out['steps']).tolist()}")
  assert_logits_close(out["logits"], fixture("logits.npy", twin), tol["act"], f"hrm {twin} ACT logits")
  assert_logits_close(single, fixture("logits_single_pass.npy", twin), tol["single"], f"hrm {twin} single pass")
  assert_logits_close(out["q_logits"], fixture("q_logits.npy", twin), tol["q"], f"hrm {twin} q_logits")
  np.testing.assert_array_equal(np.asarray(out["steps"]), fixture("steps.npy", twin))
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, jnp.asarray(ids))), np.asarray(out["logits"]))


@pytest.mark.parametrize("twin", TWINS)
def test_greedy_continuation_matches_the_original_chat_loop(loaded, twin):
  """hrm_chat's loop with argmax: the whole sequence through the ACT forward for every new token. Here the
  window is right-padded to a fixed length with the padding masked (one compile). The perturbed twin's forwards
  each halt after 1 segment."""
  module, params = loaded[twin]
  want = fixture("greedy_tokens.npy", twin)
  ids = list(fixture("input_ids.npy", twin)[0, :8])
  width = len(ids) + len(want)
  step = jax.jit(lambda p, t, m: module.apply({"params": p}, t, padding_mask_BxT=m))
  for _ in range(len(want)):
    window = np.zeros((1, width), np.int32)
    window[0, :len(ids)] = ids
    logits = step(params, jnp.asarray(window), jnp.asarray(np.arange(width)[None] < len(ids)))
    ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
  assert ids[8:] == want.tolist()


@pytest.mark.parametrize("twin", TWINS)
def test_model_directory_carries_vocabulary_and_history(converted, twin):
  config = modeldir.read_config(converted[twin])
  assert config["model"]["arch"] == "hrm" and config["model"]["causal"] is False
  assert config["model"]["q_head_pool"] == "mean" and config["model"]["norm_position"] == "post"
  assert config["source"]["family"] == "hrm"
  assert config["source"]["datasets_trained"] == ["fixture"]
  assert config["source"]["timestamp"] == "2025-01-01T00:00:00"
  tok = tokenizers.load_tokenizer(converted[twin])
  with open(os.path.join(FOLDERS[twin], "continual_tokenizer.json"), encoding="utf-8") as f:
    vocab = json.load(f)["vocab"]
  assert tok.vocab_size == 96 and tok.vocab() == vocab
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  ids = tok.encode("Hi!\u2603")
  assert ids == [vocab["H"], vocab["i"], vocab["!"], 1]  # unknown character -> <UNK>
  assert tok.decode([0, 2] + ids[:3]) == "<BOS>Hi!"  # <PAD> (0) is dropped, as the original does


# ------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("twin", TWINS)
def test_round_trip_is_bit_exact(converted, tmp_path, twin):
  out = api.jax2torch(converted[twin], str(tmp_path))  # a directory: the original file name is used
  assert os.path.basename(out) == "hrm_continual_learning.pt"
  original = torchfile.load(os.path.join(FOLDERS[twin], "hrm_continual_learning.pt"))
  written = torchfile.load(out)
  assert_identical(written, original)
  loaded = torch.load(out, weights_only=True)  # as the original trainer and chat load it
  assert loaded["config"]["forward_dtype"] is torch.float32
  # the tokenizer the original reads beside the checkpoint comes back byte for byte
  with open(os.path.join(FOLDERS[twin], "continual_tokenizer.json"), "rb") as f:
    assert (tmp_path / "continual_tokenizer.json").read_bytes() == f.read()
  api.jax2torch(converted[twin], str(tmp_path / "again.pt"))  # beside an identical tokenizer file: nothing to replace
  (tmp_path / "continual_tokenizer.json").write_text("{}")
  with pytest.raises(ConversionError, match="continual_tokenizer.json already exists"):  # a different one stays
    api.jax2torch(converted[twin], str(tmp_path / "third.pt"))
  assert (tmp_path / "continual_tokenizer.json").read_text() == "{}" and not (tmp_path / "third.pt").exists()
  print(f"\nhrm {twin}: {len(written['model_state_dict'])} tensors and {len(written) - 1} other entries bit-identical "
        "after torch2jax -> jax2torch")


# ------------------------------------------------------------------------------------------ other models
class OriginalHRM(torch.nn.Module):
  """The original's forward pass (SPEC.md), with its state_dict layout, for exports of jaxlm models."""

  def __init__(self, vocab_size, hidden_size, num_heads, L_layers, H_layers, expansion, halt_max_steps):
    super().__init__()
    self.h, self.heads, self.halt_max_steps = hidden_size, num_heads, halt_max_steps
    width = -(-int(expansion * hidden_size * 2 / 3) // 256) * 256
    self.register_buffer("z0_L", torch.zeros(1, 1, hidden_size))
    self.register_buffer("z0_H", torch.zeros(1, 1, hidden_size))
    self.input_embedding = torch.nn.Module()
    self.input_embedding.embedding_weight = torch.nn.Parameter(torch.zeros(vocab_size, hidden_size))
    self.output_head = torch.nn.Linear(hidden_size, vocab_size, bias=False)
    self.q_head = torch.nn.Linear(hidden_size, 2)
    self.rope = torch.nn.Module()
    hd = hidden_size // num_heads
    self.rope.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd)))

    def module(n):
      m = torch.nn.Module()
      m.layers = torch.nn.ModuleList()
      for _ in range(n):
        block = torch.nn.Module()
        block.attention = torch.nn.Module()
        block.attention.qkv_proj = torch.nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        block.attention.o_proj = torch.nn.Linear(hidden_size, hidden_size, bias=False)
        block.feed_forward = torch.nn.Module()
        block.feed_forward.gate_up_proj = torch.nn.Linear(hidden_size, 2 * width, bias=False)
        block.feed_forward.down_proj = torch.nn.Linear(width, hidden_size, bias=False)
        block.norm1, block.norm2 = torch.nn.RMSNorm(hidden_size, eps=1e-5), torch.nn.RMSNorm(hidden_size, eps=1e-5)
        m.layers.append(block)
      return m
    self.L_module, self.H_module = module(L_layers), module(H_layers)

  def _block(self, block, x):
    b, s, _ = x.shape
    hd = self.h // self.heads
    q, k, v = block.attention.qkv_proj(x).view(b, s, 3, self.heads, hd).unbind(2)
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), self.rope.inv_freq)
    cos, sin = torch.cat([freqs, freqs], -1).cos()[:, None], torch.cat([freqs, freqs], -1).sin()[:, None]
    rot = lambda t: torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1)
    q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # non-causal
    x = block.norm1(x + block.attention.o_proj(attn.transpose(1, 2).reshape(b, s, self.h)))
    gate, up = block.feed_forward.gate_up_proj(x).chunk(2, dim=-1)
    return block.norm2(x + block.feed_forward.down_proj(F.silu(gate) * up))

  def _run(self, module, x):
    for block in module.layers:
      x = self._block(block, x)
    return x

  def forward(self, ids, n, t):
    x = self.input_embedding.embedding_weight[ids] * math.sqrt(self.h)
    z_L, z_H = self.z0_L.expand(*ids.shape, self.h), self.z0_H.expand(*ids.shape, self.h)
    for _ in range(self.halt_max_steps):
      for i in range(n * t):
        z_L = self._run(self.L_module, z_L + z_H + x)
        if (i + 1) % t == 0:
          z_H = self._run(self.H_module, z_H + z_L)
      q = self.q_head(z_H.mean(dim=1))
      if bool((q[:, 0] > q[:, 1]).all()):
        break
    return self.output_head(z_H)


def test_export_of_another_model_loads_strictly_in_the_original(tmp_path):
  model = dict(arch="hrm", vocab_size=30, d_model=32, n_heads=2, l_layers=1, h_layers=2, expansion=4.0,
               mlp_rounding="int", halt_max_steps=2, n_cycles=1, t_steps=3, causal=False, norm_position="post",
               q_head_pool="mean", act_batch_halt=True, init_state="learned")
  _, module = build_model(model)
  ids = np.random.RandomState(0).randint(0, 30, (2, 7)).astype(np.int32)
  params = jax.jit(module.init)(jax.random.key(3), jnp.asarray(ids))["params"]
  # Trained-like, as the perturbed fixture: 1-D parameters (norm scales, the initial states, the Q-head bias)
  # += 0.3 randn, matrices += 0.3 std randn; so no norm scale is 1 and mixed-up norms show.
  rng = np.random.default_rng(5)
  params = jax.tree.map(lambda p: (p + 0.3 * (1.0 if p.ndim == 1 else np.std(p)) * rng.standard_normal(p.shape))
                        .astype(np.float32), jax.tree.map(np.asarray, params))
  chars = [chr(ord("a") + i) for i in range(26)] + [" ", ".", ",", "\n"]
  src = modeldir.save_model_dir(str(tmp_path / "jax"), model, params, {"kind": "char", "chars": chars})
  out = api.jax2torch(src, str(tmp_path / "hrm.pt"), family="hrm")
  ckpt = torch.load(out, weights_only=True)
  config = {k: v for k, v in ckpt["config"].items() if k not in ("forward_dtype", "halt_exploration_prob")}
  reference = OriginalHRM(**config)
  reference.load_state_dict(ckpt["model_state_dict"], strict=True)
  with torch.no_grad():
    want = reference(torch.from_numpy(ids).long(), n=1, t=3).numpy()
  _, module, params, _ = modeldir.load_model_dir(src)
  got = np.asarray(module.apply({"params": params}, jnp.asarray(ids)))
  # measured 1.7e-6 of max|logit| 1.99 (relative 8.5e-7)
  assert_logits_close(got, want, 4e-6, "hrm: exported jaxlm model in the independent torch reference")
  assert ckpt["total_parameters"] == sum(p.numel() for p in reference.parameters())
  assert [len(o["param_groups"][0]["params"]) for o in ckpt["optimizer_states"]] == [1, 4 + 6 * 3 - 1]
  assert ckpt["tokenizer_vocab"] == {c: i for i, c in enumerate(chars)}


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
  model = dict(arch="hrm", vocab_size=30, d_model=32, n_heads=2, l_layers=1, h_layers=1)  # pre-norm default
  _, module = build_model(model)
  params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  src = modeldir.save_model_dir(str(tmp_path / "jax"), model, params)
  with pytest.raises(ConversionError, match="model.norm_position is 'pre'"):
    api.jax2torch(src, str(tmp_path / "hrm.pt"), family="hrm")


def test_bad_checkpoints_name_the_key(tmp_path):
  ckpt = torchfile.load(CHECKPOINT)
  ckpt["model_state_dict"]["H_module.layers.1.norm2.weight"] = np.zeros(3, np.float32)
  bad = str(tmp_path / "bad.pt")
  torchfile.save(ckpt, bad)
  with pytest.raises(ConversionError, match=r"'H_module.layers.1.norm2.weight' has shape \(3,\)"):
    api.torch2jax(bad, str(tmp_path / "out"), family="hrm")
  assert hrm_convert.tokens_from_vocab({"a": 0, "b": 1}, "x") == ["a", "b"]
  with pytest.raises(ConversionError, match="token ids are not 0..1"):
    hrm_convert.tokens_from_vocab({"a": 0, "b": 2}, "x")
