"""convert torch2jax / jax2torch for HRM-Text1 save_pretrained folders (config.json + pytorch_model.bin or
model.safetensors): bit-exact round trips in both formats, the tie, source dtypes, the T5 tokenizer, errors, and
an export of a jaxlm-initialised model loaded strictly by an independent torch implementation of SPEC.md.

(The real original class was also checked by hand: transformers 4.55.2 `HRMText1.from_pretrained` on folders
written here, with only pytorch_model.bin or only model.safetensors, reproduces the fixture logits bit for bit.)

Every fixture test runs on the untrained fixture and its perturbed twin (tests/fixtures/hrm_text1/perturbed/, made
by the original code: trained-like weights, norm scales away from 1, logits of magnitude ~200, layer 0's pondering
exits early).
"""
import json
import math
import os
import shutil

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from convert import api, safetensors_file, torchfile  # noqa: E402
from convert.errors import ConversionError  # noqa: E402
from jaxlm import modeldir  # noqa: E402
from fixture_tolerance import assert_logits_close  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hrm_text1")
TWINS = ("untrained", "perturbed")
FOLDERS = {"untrained": FIXTURE, "perturbed": os.path.join(FIXTURE, "perturbed")}
FILES = ("config.json", "generation_config.json")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """twin -> model directory imported from that twin's save_pretrained folder."""
  return {twin: api.torch2jax(folder, str(tmp_path_factory.mktemp("import") / twin))
          for twin, folder in FOLDERS.items()}


@pytest.fixture(scope="module")
def exported(imported, tmp_path_factory):
  """twin -> folder exported back from the imported model directory."""
  return {twin: api.jax2torch(path, str(tmp_path_factory.mktemp("export") / twin)) for twin, path in imported.items()}


def read_bytes(path):
  with open(path, "rb") as f:
    return f.read()


def assert_same_state(written, original, path="state_dict"):
  """Same keys in the same order, dtypes, shapes and bytes."""
  assert type(written) is type(original)
  assert list(written) == list(original), path
  for key in original:
    a, b = written[key], original[key]
    assert (a.dtype, a.shape) == (b.dtype, b.shape), key
    assert a.tobytes() == b.tobytes(), f"{path}[{key!r}] differs"


def folder_with(tmp_path, name, weights_name, tensors=None, config=None):
  """A save_pretrained-like folder: the fixture's json files plus one weights file."""
  folder = tmp_path / name
  folder.mkdir()
  for f in FILES:  # the twins' json files are the same
    shutil.copy(os.path.join(FIXTURE, f), folder / f)
  if config is not None:
    (folder / "config.json").write_text(json.dumps(config))
  if tensors is None:
    shutil.copy(os.path.join(FIXTURE, "pytorch_model.bin"), folder / weights_name)
  elif weights_name.endswith(".safetensors"):
    safetensors_file.save(tensors, str(folder / weights_name), metadata={"format": "pt"})
  else:
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, folder / weights_name)
  return str(folder)


# ------------------------------------------------------------------------------------- import
def test_detects_the_folder_and_the_weights_file():
  assert api.detect(FIXTURE)[0].name == "hrm_text1"
  assert api.detect(os.path.join(FIXTURE, "pytorch_model.bin"))[0].name == "hrm_text1"


@pytest.mark.parametrize("twin", TWINS)
def test_imported_model_and_parameter_count(imported, twin):
  config = modeldir.read_config(imported[twin])
  model = config["model"]
  assert (model["arch"], model["family"], model["n_heads"], model["halt_max_steps"]) == \
      ("hrm_text1", "hrm_text1", 4, 4)
  assert (model["ponder_loss"], model["exit_over_padding"], model["remat"]) == ("count", True, True)
  assert config["source"]["hf_config"]["model_type"] == "hrm_text1"
  params = modeldir.load(imported[twin]).params
  assert sum(x.size for x in jax.tree.leaves(params)) == 170_690  # unique parameters (the head is the embedding)


# Relative to the largest |logit|. Measured max abs error / max|logit|: untrained 2.3e-5 / 78.6 = 2.9e-7,
# perturbed 1.1e-3 / 199 = 5.6e-6 (its matrices were scaled x6: large activations through 2 layers x 3 pondering
# steps of 2 blocks; in float64, the reference below puts the original's float32 logits at 4.1e-6 and jaxlm's at
# 7.3e-6 from the exact values). What the bugs to catch cost (relative, smaller twin): RoPE base x1.3 1.0e-3,
# post-norm blocks 0.2, swapped norm weights (perturbed) 1.3. A 10x RMSNorm eps costs only 1.1e-6 here
# (activations are large; the untrained halt probabilities move by 1.1e-5): the export test below catches it (0.54).
LOGITS_REL = {"untrained": 1.5e-6, "perturbed": 2e-5}
# Halt probabilities (in [0, 1]), absolute; measured: untrained 6.3e-7, perturbed 4.3e-5 (layer 1's halt head reads
# the large perturbed activations).
HALT_ABS = {"untrained": 3e-6, "perturbed": 1.5e-4}


@pytest.mark.parametrize("twin", TWINS)
def test_imported_fixture_reproduces_the_original_outputs(imported, twin):
  """Logits and pondering of the original (HRMText1 in eval mode) on the fixture's input_ids; the perturbed twin's
  layer 0 stops after 1 block update (the original records NaN for the halt reads it did not make)."""
  _, module, params, _ = modeldir.load_model_dir(imported[twin])
  ids = np.load(os.path.join(FOLDERS[twin], "input_ids.npy"))
  out = jax.jit(lambda p, t: module.apply({"params": p}, t, method="ponder"))(params, jnp.asarray(ids))
  assert_logits_close(out["logits"], np.load(os.path.join(FOLDERS[twin], "logits.npy")), LOGITS_REL[twin],
                      f"hrm_text1 {twin}")
  want = np.load(os.path.join(FOLDERS[twin], "halt_probs.npy"))
  got = np.asarray(out["halt_probs"])
  ran = ~np.isnan(want)
  halt_err = float(np.abs(got[ran] - want[ran]).max())
  print(f"hrm_text1 {twin}: halt_probs max abs error {halt_err:.3g}; n_updates {np.asarray(out['n_updates']).tolist()}")
  assert halt_err <= HALT_ABS[twin]
  assert (got[~ran] == 0).all()  # jaxlm records 0 for the reads after an early exit
  if twin == "perturbed":
    assert (~ran).any()


# ------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("twin", TWINS)
def test_round_trip_pytorch_model_bin_is_bit_exact(exported, twin):
  exported, fixture = exported[twin], FOLDERS[twin]
  for f in FILES:  # config.json / generation_config.json exactly as save_pretrained wrote them
    assert read_bytes(os.path.join(exported, f)) == read_bytes(os.path.join(fixture, f)), f
  original = torchfile.load(os.path.join(fixture, "pytorch_model.bin"))
  written = torchfile.load(os.path.join(exported, "pytorch_model.bin"))
  assert_same_state(written, original)
  state = torch.load(os.path.join(exported, "pytorch_model.bin"), weights_only=True)
  # as save_pretrained writes it: the tied head is stored once, both keys load
  assert state["lm_head.weight"].untyped_storage().data_ptr() == state["token_embeddings.weight"].untyped_storage().data_ptr()
  print(f"\nhrm_text1 {twin}: {len(written)} tensors, config.json and generation_config.json bit-identical after "
        "torch2jax -> jax2torch (pytorch_model.bin)")


@pytest.mark.parametrize("twin", TWINS)
def test_round_trip_through_model_safetensors_is_bit_exact(exported, tmp_path, twin):
  exported, fixture = exported[twin], FOLDERS[twin]
  original = torchfile.load(os.path.join(fixture, "pytorch_model.bin"))
  st = safetensors_file.load(os.path.join(exported, "model.safetensors"))
  assert set(st) == set(original)  # both tied keys, as separate (equal) tensors
  for key, value in original.items():
    assert st[key].tobytes() == value.tobytes(), key
  # a folder with both files reads model.safetensors (as from_pretrained does); back to pytorch_model.bin
  again = api.torch2jax(exported, str(tmp_path / "again"))
  assert modeldir.read_config(again)["source"]["format"] == "safetensors"
  out = api.jax2torch(again, str(tmp_path / "back"), hrm_text1_weights="bin")
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "pytorch_model.bin"]
  assert_same_state(torchfile.load(os.path.join(out, "pytorch_model.bin")), original)
  for f in FILES:
    assert read_bytes(os.path.join(out, f)) == read_bytes(os.path.join(fixture, f)), f


@pytest.mark.parametrize("twin", TWINS)
def test_safetensors_with_one_copy_of_the_tie_and_bfloat16(tmp_path, twin):
  """save_pretrained-style safetensors keep one tied key; a bf16 checkpoint goes back to bf16 bit for bit."""
  import ml_dtypes
  original = torchfile.load(os.path.join(FOLDERS[twin], "pytorch_model.bin"))
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in original.items() if k != "lm_head.weight"}
  folder = folder_with(tmp_path, "bf16", "model.safetensors", bf16)
  out = api.jax2torch(api.torch2jax(folder, str(tmp_path / "m")), str(tmp_path / "out"),
                      hrm_text1_weights="safetensors")
  written = safetensors_file.load(os.path.join(out, "model.safetensors"))
  for key, value in bf16.items():
    assert written[key].dtype == value.dtype and written[key].tobytes() == value.tobytes(), key
  assert written["lm_head.weight"].tobytes() == bf16["token_embeddings.weight"].tobytes()
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"


# ------------------------------------------------------------------------------------- T5 vocabulary
def test_t5_vocabulary_gets_the_sentencepiece_tokenizer(tmp_path):
  from jaxlm.data.tokenizers import load_tokenizer
  rng = np.random.RandomState(0)
  v, d, f = 32100, 8, 16
  shapes = {"token_embeddings.weight": (v, d), "final_norm.weight": (d,), "lm_head.weight": (v, d),
            "halt_heads.0.0.weight": (1, d), "halt_heads.0.0.bias": (1,)}
  for block in ("H_module", "L_module"):
    p = f"layers.0.{block}."
    shapes.update({p + "norm1.weight": (d,), p + "norm2.weight": (d,), p + "mlp.w1.weight": (f, d),
                   p + "mlp.w2.weight": (f, d), p + "mlp.w3.weight": (d, f)})
    shapes.update({p + f"attn.{n}.weight": (d, d) for n in ("q_proj", "k_proj", "v_proj", "out_proj")})
  tensors = {k: rng.randn(*s).astype(np.float32) for k, s in shapes.items()}
  tensors["lm_head.weight"] = tensors["token_embeddings.weight"]
  for block in ("H_module", "L_module"):  # head_dim 4: the buffer says 2 heads of width 4
    tensors[f"layers.0.{block}.attn.rotary_emb.inv_freq"] = (1.0 / 10000 ** (np.arange(0, 4, 2) / 4)).astype(np.float32)
  config = {"model_type": "hrm_text1", "vocab_size": v, "n_embd": d, "n_head": 2, "n_layers": 1, "d_ff": f,
            "halt_max_steps": 3}
  out = api.torch2jax(folder_with(tmp_path, "t5", "pytorch_model.bin", tensors, config), str(tmp_path / "m"))
  tok = load_tokenizer(out)
  assert (tok.kind, tok.vocab_size, tok.eos_id, tok.pad_id) == ("sentencepiece", 32100, 1, 0)
  assert tok.decode(tok.encode("The cat sat.")) == "The cat sat."
  assert tok.decode([32099]) == "<extra_id_0>"


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("change,message", [
    ({"n_head": 8}, r"config.json: n_head=8 but the tensors .* say 4"),
    ({"model_type": "llama"}, "model_type is 'llama', expected 'hrm_text1'"),
    ({"use_rotary_embeddings": False}, "use_rotary_embeddings is false"),
])
def test_bad_config_json_names_the_field(tmp_path, change, message):
  with open(os.path.join(FIXTURE, "config.json")) as f:
    config = {**json.load(f), **change}
  folder = folder_with(tmp_path, "bad", "pytorch_model.bin", config=config)
  with pytest.raises(ConversionError, match=message):
    api.torch2jax(folder, str(tmp_path / "m"), family="hrm_text1")


def test_bad_tensors_name_the_key(tmp_path):
  original = dict(torchfile.load(os.path.join(FIXTURE, "pytorch_model.bin")))
  untied = {**original, "lm_head.weight": original["lm_head.weight"] + 1.0}
  with pytest.raises(ConversionError, match="lm_head.weight differs from token_embeddings.weight"):
    api.torch2jax(folder_with(tmp_path, "untied", "pytorch_model.bin", untied), str(tmp_path / "a"))
  missing = {k: v for k, v in original.items() if k != "layers.1.L_module.mlp.w2.weight"}
  with pytest.raises(ConversionError, match="missing tensor 'layers.1.L_module.mlp.w2.weight'"):
    api.torch2jax(folder_with(tmp_path, "missing", "model.safetensors", missing), str(tmp_path / "b"))
  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(os.path.join(FIXTURE, "config.json"), empty / "config.json")
  with pytest.raises(ConversionError, match="no model.safetensors or pytorch_model.bin"):
    api.torch2jax(str(empty), str(tmp_path / "c"))


# ------------------------------------------------------------------------------------- independent torch model
class RefBlock(torch.nn.Module):
  """SPEC.md's pre-norm block (RMSNorm without upcast, rotate-half RoPE from the saved inv_freq buffer)."""

  def __init__(self, d, heads, f):
    super().__init__()
    self.heads = heads
    self.norm1, self.norm2 = RefNorm(d), RefNorm(d)
    self.attn = torch.nn.Module()
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
      setattr(self.attn, name, torch.nn.Linear(d, d, bias=False))
    self.attn.rotary_emb = torch.nn.Module()
    self.attn.rotary_emb.register_buffer("inv_freq", torch.zeros(d // heads // 2))
    self.mlp = torch.nn.Module()
    self.mlp.w1, self.mlp.w2 = torch.nn.Linear(d, f, bias=False), torch.nn.Linear(d, f, bias=False)
    self.mlp.w3 = torch.nn.Linear(f, d, bias=False)

  def rope(self, x):
    s = x.shape[2]
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), self.attn.rotary_emb.inv_freq)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin

  def forward(self, x):
    b, s, d = x.shape
    h = self.norm1(x)
    q, k, v = (getattr(self.attn, n)(h).view(b, s, self.heads, -1).transpose(1, 2)
               for n in ("q_proj", "k_proj", "v_proj"))
    a = torch.nn.functional.scaled_dot_product_attention(self.rope(q), self.rope(k), v, is_causal=True)
    x = x + self.attn.out_proj(a.transpose(1, 2).reshape(b, s, d))
    h = self.norm2(x)
    return x + self.mlp.w3(torch.nn.functional.silu(self.mlp.w1(h)) * self.mlp.w2(h))


class RefNorm(torch.nn.Module):
  def __init__(self, d):
    super().__init__()
    self.weight = torch.nn.Parameter(torch.ones(d))

  def forward(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class RefHRMText1(torch.nn.Module):
  def __init__(self, v, d, heads, n_layers, f, steps):
    super().__init__()
    self.steps = steps
    self.token_embeddings = torch.nn.Embedding(v, d)
    self.layers = torch.nn.ModuleList()
    for _ in range(n_layers):
      pair = torch.nn.Module()
      pair.H_module, pair.L_module = RefBlock(d, heads, f), RefBlock(d, heads, f)
      self.layers.append(pair)
    self.final_norm = RefNorm(d)
    self.lm_head = torch.nn.Linear(d, v, bias=False)
    self.halt_heads = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Linear(d, 1), torch.nn.Sigmoid()) for _ in range(n_layers))
    self.lm_head.weight = self.token_embeddings.weight

  def forward(self, ids):
    z_l = self.token_embeddings(ids)
    z_h, total, eps = torch.zeros_like(z_l), torch.zeros_like(z_l), 1e-6
    for pair, head in zip(self.layers, self.halt_heads):
      rem = torch.ones(ids.shape)
      for step in range(self.steps):
        p = head(z_h).squeeze(-1).clamp(eps, 1 - eps)
        last = step == self.steps - 1
        total = total + (rem * (torch.ones_like(p) if last else p)).unsqueeze(-1) * z_h
        if last:
          break
        rem = rem * (1 - p)
        if torch.all(rem < eps):
          break
        z_l = pair.L_module(z_l + z_h)
        z_h = pair.H_module(z_h + z_l)
    return self.lm_head(self.final_norm(total))


def test_export_of_a_jaxlm_model_loads_strictly_into_a_torch_implementation(tmp_path):
  from jaxlm.models import build_model
  model = {"arch": "hrm_text1", "family": "hrm_text1", "vocab_size": 80, "d_model": 32, "n_heads": 4,
           "n_layers": 2, "d_ff": 48, "max_seq_len": 32, "halt_max_steps": 3}
  config, module = build_model(model)
  params = nn.unbox(module.init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))["params"])
  # Trained-like, as the perturbed fixture: norm scales and halt biases += 0.3 randn, matrices += 0.3 std randn
  # (so no norm scale is 1 and mixed-up norms show); then the token embedding scaled to rms 2e-3, where the
  # first block's RMSNorm eps (1e-6 against a mean square of 4e-6) matters: a wrong eps shows, not only here.
  rng = np.random.default_rng(7)
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  flat = {k: v + 0.3 * (1.0 if k.endswith(("scale", "bias")) else np.std(v)) * rng.standard_normal(v.shape)
          for k, v in flat.items()}
  flat["embed/embedding"] *= 2e-3 / np.sqrt(np.mean(np.square(flat["embed/embedding"])))
  params = traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in flat.items()}, sep="/")
  src = modeldir.save_model_dir(str(tmp_path / "jax"), config.to_dict(), params,
                                {"kind": "ids", "vocab_size": 80})
  out = api.jax2torch(src, str(tmp_path / "torch"), family="hrm_text1")
  with open(os.path.join(out, "config.json")) as f:
    cfg = json.load(f)
  assert (cfg["n_embd"], cfg["n_head"], cfg["halt_max_steps"], cfg["architectures"]) == (32, 4, 3, ["HRMText1"])
  ids = np.random.RandomState(0).randint(0, 80, (2, 16))
  want = np.asarray(jax.jit(lambda p, t: module.apply({"params": p}, t))(params, jnp.asarray(ids)))
  from safetensors.torch import load_file
  for state in (torch.load(os.path.join(out, "pytorch_model.bin"), weights_only=True),
                load_file(os.path.join(out, "model.safetensors"))):
    ref = RefHRMText1(80, 32, 4, 2, 48, 3)
    ref.load_state_dict(state, strict=True)
    with torch.no_grad():
      got = ref(torch.from_numpy(ids)).numpy()
    # measured 2.1e-8 of max|logit| 0.043 (relative 4.8e-7); a 10x RMSNorm eps costs 0.54 here
    assert_logits_close(got, want, 2.5e-6, "hrm_text1: exported jaxlm model in the independent torch reference")
