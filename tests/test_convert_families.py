"""torch2jax / jax2torch for HROM, Optimus Prime and YingGem against the original projects' fixtures.

Fixtures (tests/fixtures/<family>/) were made by the original code (see each folder's README.md). The
`*Reference` torch modules below are independent re-implementations of the original forward passes, written
from the specs, used to check exports of jaxlm-initialised (random) models with strict load_state_dict.
"""
import dataclasses
import math
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from convert import api, torchfile  # noqa: E402
from jaxlm import modeldir  # noqa: E402
from jaxlm.models import build_model  # noqa: E402
from checkpoint_compare import assert_identical  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CHECKPOINTS = {"hrom": "hrom/hrom_20261125_133958_step0.pt", "optimus_prime": "optimus_prime/best_model.pt",
               "yinggem": "yinggem/yinggem_best.pth"}
STATE_KEY = {"hrom": "model", "optimus_prime": "model_state_dict", "yinggem": None}
ATOL = 1e-5


def fixture(family, name):
  return os.path.join(FIXTURES, family, name)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """family -> model directory converted from the fixture checkpoint (family auto-detected)."""
  root = tmp_path_factory.mktemp("converted")
  return {family: api.torch2jax(os.path.join(FIXTURES, path), str(root / family))
          for family, path in CHECKPOINTS.items()}


def _logits(model_dir, ids, mask=None):
  _, module, params, _ = modeldir.load_model_dir(model_dir)
  return forward(module, params, ids, mask)


def forward(module, params, ids, mask=None):
  """Jitted: one XLA compile instead of one per primitive (keeps the tests fast)."""
  apply = jax.jit(lambda p, t, m: module.apply({"params": p}, t, padding_mask_BxT=m))
  return np.asarray(apply(params, jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))


# ----------------------------------------------------------------------------------- fixture logits
@pytest.mark.parametrize("family", sorted(CHECKPOINTS))
def test_converted_model_reproduces_original_logits(converted, family):
  ids = np.load(fixture(family, "input_ids.npy"))
  if family == "hrom":  # training path (causal + padding mask) and generation path (causal only)
    err = np.abs(_logits(converted[family], ids, np.load(fixture(family, "attention_mask.npy")))
                 - np.load(fixture(family, "logits.npy"))).max()
    err_nomask = np.abs(_logits(converted[family], ids) - np.load(fixture(family, "logits_nomask.npy"))).max()
    print(f"\n{family}: max abs logit error {err:.3g} (mask), {err_nomask:.3g} (no mask)")
    assert err_nomask <= ATOL
  else:
    err = np.abs(_logits(converted[family], ids) - np.load(fixture(family, "logits.npy"))).max()
    print(f"\n{family}: max abs logit error {err:.3g}")
  assert err <= ATOL


def test_detected_family_and_recorded_settings(converted):
  from jaxlm.data.tokenizers import load_tokenizer
  for family, path in converted.items():
    config = modeldir.read_config(path)
    assert config["source"]["family"] == config["model"]["family"] == family
    assert load_tokenizer(path).vocab_size == 256  # tokenizer.json: ids pass through (fixtures are not GPT-2)
  assert modeldir.read_config(converted["optimus_prime"])["model"]["n_heads"] == 4  # from the config.json beside it
  assert modeldir.read_config(converted["yinggem"])["model"]["attention_window"] == 8
  assert modeldir.read_config(converted["hrom"])["model"]["norm"] == "layer"


# ----------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("family", sorted(CHECKPOINTS))
def test_round_trip_is_bit_exact(converted, family, tmp_path):
  out = api.jax2torch(converted[family], str(tmp_path))  # a directory: the original file name is used
  original = torchfile.load(fixture(family, os.path.basename(CHECKPOINTS[family])))
  written = torchfile.load(out)
  assert_identical(written, original)  # every entry: tensors, buffers, step/config/optimizer/scheduler...
  state = written[STATE_KEY[family]] if STATE_KEY[family] else written
  print(f"\n{family}: {len(state)} tensors bit-identical after torch2jax -> jax2torch ({os.path.basename(out)})")
  if family == "hrom":
    assert os.path.basename(out).startswith("hrom_") and out.endswith("_step0.pt")
  else:
    assert os.path.basename(out) == os.path.basename(CHECKPOINTS[family])


# ----------------------------------------------------------------------------------- independent torch models
def rotate_half(x):
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat([-x2, x1], dim=-1)


class HalfRope(nn.Module):
  """Rotate-half RoPE with a persistent inv_freq buffer (HROM calls it inv_freq, YingGem freqs)."""

  def __init__(self, head_dim, name):
    super().__init__()
    self.name = name
    self.register_buffer(name, 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)))

  def forward(self, x):  # x [B, H, T, hd]
    t = torch.arange(x.shape[2], dtype=torch.float32)
    emb = torch.outer(t, getattr(self, self.name)).repeat(1, 2)
    return x * emb.cos() + rotate_half(x) * emb.sin()


class SigmoidGLU(nn.Module):
  def forward(self, x):
    a, g = x.chunk(2, dim=-1)
    return a * torch.sigmoid(g)


class HROMAttention(nn.Module):
  def __init__(self, d, n):
    super().__init__()
    self.n, self.hd = n, d // n
    self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
    self.rotary = HalfRope(self.hd, "inv_freq")

  def forward(self, x, mask):
    b, t, d = x.shape
    q, k, v = self.qkv(x).reshape(b, t, 3, self.n, self.hd).unbind(2)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))
    q, k = self.rotary(q), self.rotary(k)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd) + mask[:, None]
    return self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))


class HROMBlock(nn.Module):
  def __init__(self, d, n, f):
    super().__init__()
    self.attn = HROMAttention(d, n)
    self.ff = nn.Sequential(nn.Linear(d, 2 * f), SigmoidGLU(), nn.Linear(f, d))
    self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

  def forward(self, x, mask):
    x = x + self.attn(self.norm1(x), mask)
    return x + self.ff(self.norm2(x))


class HROMReference(nn.Module):
  def __init__(self, v, d, n_layers, n, f):
    super().__init__()
    self.embed = nn.Embedding(v, d)
    self.blocks = nn.ModuleList([HROMBlock(d, n, f) for _ in range(n_layers)])
    self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, v)

  def forward(self, ids, attention_mask=None):
    t = ids.shape[1]
    mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)[None].expand(ids.shape[0], t, t)
    if attention_mask is not None:
      mask = mask + (1.0 - attention_mask[:, None, :].float()) * torch.finfo(torch.float32).min
    x = self.embed(ids)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.norm(x))


def interleaved_rope(x):  # x [B, T, H, hd]; torchtune: pairs (2i, 2i+1), theta 10000
  t, hd = x.shape[1], x.shape[-1]
  inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
  ang = torch.outer(torch.arange(t, dtype=torch.float32), inv)[None, :, None, :]
  x1, x2 = x[..., 0::2], x[..., 1::2]
  return torch.stack([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1).flatten(-2)


class OptimusAttention(nn.Module):
  def __init__(self, d, n, k):
    super().__init__()
    self.n, self.k, self.hd = n, k, d // n
    self.q_proj = nn.Linear(d, d, bias=False)
    self.k_proj = nn.Linear(d, k * self.hd, bias=False)
    self.v_proj = nn.Linear(d, k * self.hd, bias=False)
    self.output_proj = nn.Linear(d, d, bias=False)

  def forward(self, x):
    b, t, d = x.shape
    q = interleaved_rope(self.q_proj(x).view(b, t, self.n, self.hd)).transpose(1, 2)
    k = interleaved_rope(self.k_proj(x).view(b, t, self.k, self.hd)).transpose(1, 2)
    v = self.v_proj(x).view(b, t, self.k, self.hd).transpose(1, 2)
    k, v = (z.repeat_interleave(self.n // self.k, dim=1) for z in (k, v))  # query head h uses kv head h // G
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.output_proj(out.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
  def __init__(self, d, f):
    super().__init__()
    self.w1, self.w2, self.w3 = nn.Linear(d, f), nn.Linear(d, f), nn.Linear(f, d)

  def forward(self, x):
    return self.w3(self.w1(x) * F.silu(self.w2(x)))


class OptimusBlock(nn.Module):
  def __init__(self, d, n, k, f):
    super().__init__()
    self.norm1, self.attn, self.norm2, self.mlp = nn.RMSNorm(d), OptimusAttention(d, n, k), nn.RMSNorm(d), SwiGLU(d, f)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class OptimusReference(nn.Module):
  def __init__(self, v, d, n_layers, n, k, f):
    super().__init__()
    self.embed = nn.Embedding(v, d)
    self.layers = nn.ModuleList([OptimusBlock(d, n, k, f) for _ in range(n_layers)])
    self.norm, self.head = nn.RMSNorm(d), nn.Linear(d, v, bias=False)  # nn.RMSNorm eps=None: finfo eps

  def forward(self, ids):
    x = self.embed(ids)
    for layer in self.layers:
      x = layer(x)
    return self.head(self.norm(x))


class YingGemAttention(nn.Module):
  def __init__(self, d, n, window):
    super().__init__()
    self.n, self.hd, self.window = n, d // n, window
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
    self.rope = HalfRope(self.hd, "freqs")

  def forward(self, x):
    b, t, d = x.shape
    q, k, v = (p(x).view(b, t, self.n, self.hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
    q, k = self.rope(q), self.rope(k)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = j >= i - self.window + 1  # no causal mask: future keys are visible
    scores = ((q @ k.transpose(-2, -1)) / math.sqrt(self.hd)).masked_fill(~allowed, float("-inf"))
    return self.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))


class GeGLU(nn.Module):
  def __init__(self, d, f):
    super().__init__()
    self.proj = nn.Linear(d, 2 * f)

  def forward(self, x):
    a, g = self.proj(x).chunk(2, dim=-1)
    return a * torch.sigmoid(g)


class YingGemBlock(nn.Module):
  def __init__(self, d, n, f, window):
    super().__init__()
    self.attn_norm, self.mlp_norm = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
    self.attn = YingGemAttention(d, n, window)
    self.mlp = nn.Sequential(GeGLU(d, f), nn.Linear(f, d))

  def forward(self, x):
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class YingGemReference(nn.Module):
  def __init__(self, v, d, n_layers, n, f, window):
    super().__init__()
    self.embed = nn.Embedding(v, d)
    self.block = nn.ModuleList([YingGemBlock(d, n, f, window) for _ in range(n_layers)])
    self.norm, self.lm_head = nn.RMSNorm(d, eps=1e-6), nn.Linear(d, v)

  def forward(self, ids):
    x = self.embed(ids)
    for block in self.block:
      x = block(x)
    return self.lm_head(self.norm(x))


COMMON = dict(arch="decoder", vocab_size=97, d_model=48, n_layers=3, d_ff=80, rope_theta=10000.0)
RANDOM_MODELS = {
    "hrom": (dict(COMMON, n_heads=3, norm="layer", norm_eps=1e-5, rope_style="half", glu="sigmoid",
                  attn_bias=True, mlp_bias=True, head_bias=True, causal=True, dropout=0.1, attention_dropout=0.1),
             lambda: HROMReference(97, 48, 3, 3, 80)),
    "optimus_prime": (dict(COMMON, n_heads=4, n_kv_heads=2, norm="rms", norm_eps=float(np.finfo(np.float32).eps),
                           rope_style="interleaved", glu="silu", mlp_bias=True, causal=True),
                      lambda: OptimusReference(97, 48, 3, 4, 2, 80)),
    "yinggem": (dict(COMMON, n_heads=4, norm="rms", norm_eps=1e-6, rope_style="half", glu="sigmoid",
                     attn_bias=True, mlp_bias=True, head_bias=True, causal=False, attention_window=5),
                lambda: YingGemReference(97, 48, 3, 4, 80, 5)),
}


def random_params(model_dict, seed=0):
  """jaxlm-initialised params, then perturbed so biases and norm scales are not trivially 0 / 1."""
  _, module = build_model(model_dict)
  params = linen.meta.unbox(jax.jit(module.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"])
  params = jax.tree.map(np.asarray, params)  # perturb in numpy: no per-op XLA compiles
  rng = np.random.default_rng(seed)
  return module, jax.tree.map(lambda p: (p + 0.05 * rng.standard_normal(p.shape)).astype(np.float32), params)


@pytest.fixture
def config_module(monkeypatch):
  """What the Optimus Prime code has importable when it torch.loads its checkpoint: config.TrainingConfig."""
  module = types.ModuleType("config")

  @dataclasses.dataclass
  class TrainingConfig:
    batch_size: int = 8
  TrainingConfig.__module__ = "config"
  module.TrainingConfig = TrainingConfig
  monkeypatch.setitem(sys.modules, "config", module)
  return module


@pytest.mark.parametrize("family", sorted(RANDOM_MODELS))
def test_export_of_a_jaxlm_model_runs_in_an_independent_torch_implementation(family, tmp_path, config_module):
  model_dict, make_reference = RANDOM_MODELS[family]
  module, params = random_params(model_dict)
  model_dir = modeldir.save_model_dir(str(tmp_path / "model"), model_dict, params, source={"family": family})
  path = api.jax2torch(model_dir, str(tmp_path / "out.pt"))
  checkpoint = torch.load(path, weights_only=(family != "optimus_prime"))  # the original loaders' settings
  state = checkpoint[STATE_KEY[family]] if STATE_KEY[family] else checkpoint
  reference = make_reference().eval()
  reference.load_state_dict(state, strict=True)
  ids = np.random.default_rng(1).integers(0, 97, size=(2, 11)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 8:] = 0
  with torch.no_grad():
    args = (torch.tensor(mask),) if family == "hrom" else ()
    expected = reference(torch.tensor(ids).long(), *args).numpy()
  got = forward(module, params, ids, mask if family == "hrom" else None)
  err = np.abs(got - expected).max()
  print(f"\n{family}: jaxlm-initialised model exported, independent torch forward max abs error {err:.3g}")
  assert err <= ATOL
  if family == "optimus_prime":
    assert isinstance(checkpoint["config"], config_module.TrainingConfig)
    assert checkpoint["config"].batch_size == 8 and checkpoint["epoch"] == 0
  if family == "hrom":
    assert checkpoint["config"]["dim"] == 48 and checkpoint["config"]["n_heads"] == 3 and checkpoint["step"] == 0


def test_jax2torch_exports_a_training_workdir(converted, tmp_path):
  """A model trained in jaxlm lives in a workdir: jax2torch takes it (family from model.family)."""
  checkpoint = pytest.importorskip("jaxlm.checkpoint")
  loaded = modeldir.load(converted["hrom"])
  run = checkpoint.RunCheckpointer(str(tmp_path / "work"))
  run.save(3, {"params": loaded.params}, {"model": loaded.model_dict})
  run.close()
  out = api.jax2torch(str(tmp_path / "work"), str(tmp_path / "hrom.pt"))
  written, original = torchfile.load(out), torchfile.load(os.path.join(FIXTURES, CHECKPOINTS["hrom"]))
  assert_identical(written["model"], original["model"])  # no source metadata: defaults for the other entries
  assert written["config"]["dim"] == 64 and written["step"] == 0 and written["optimizer"]["state"] == {}


def test_refusing_a_causal_yinggem_export_is_justified(tmp_path):
  """The original YingGem attends to later tokens: the weights of a causal jaxlm model load into it, but its logits
  are not jaxlm's. jax2torch refuses such an export; the same weights with causal=False export and match."""
  from convert.errors import ConversionError
  model_dict, make_reference = RANDOM_MODELS["yinggem"]
  module, params = random_params(model_dict)
  causal_dict = dict(model_dict, causal=True)
  _, causal_module = build_model(causal_dict)
  ids = np.random.default_rng(1).integers(0, 97, size=(2, 11)).astype(np.int32)
  errors = {}
  for name, (model, jax_module, allow) in {"causal": (causal_dict, causal_module, True),
                                           "original": (model_dict, module, False)}.items():
    src = modeldir.save_model_dir(str(tmp_path / name), model, params, source={"family": "yinggem"})
    if allow:
      with pytest.raises(ConversionError, match="causal: True here, False in the original"):
        api.jax2torch(src, str(tmp_path / f"{name}.pth"))
    path = api.jax2torch(src, str(tmp_path / f"{name}.pth"), allow_different_computation=allow)
    reference = make_reference().eval()
    reference.load_state_dict(torch.load(path, weights_only=True), strict=True)
    with torch.no_grad():
      expected = reference(torch.tensor(ids).long()).numpy()
    errors[name] = np.abs(forward(jax_module, params, ids) - expected).max()
  print(f"\nyinggem: original-code logits vs jaxlm, causal model {errors['causal']:.3g}, "
        f"causal=False model {errors['original']:.3g}")
  assert errors["original"] <= ATOL and errors["causal"] > 100 * ATOL
