"""jax2torch never silently changes what a model computes, writes into directories, and fails cleanly.

- A model whose compatibility flags differ from what the target original computes is refused with one line
  (nothing written, --out untouched); --allow-different-computation writes it with a record of the differences.
- Imported originals (tests/fixtures/<family> and its perturbed/ twin) go back without the flag.
- --out ending in a separator, or naming a directory, gets the original's own file name inside it.
- File-system failures: one line naming the path, exit code 1 (2 for bad input), no traceback unless --verbose,
  --out untouched.
"""
import errno
import io
import json
import os
import shutil

import numpy as np
import pytest
from flax import traverse_util

pytest.importorskip("torch")  # the exports write torch files

from convert import api, differences, torchfile  # noqa: E402
from convert.__main__ import main  # noqa: E402
from convert.errors import ConversionError  # noqa: E402
from jaxlm import modeldir  # noqa: E402
from checkpoint_compare import assert_identical  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")  # copies of ../shared/reference
EPS_F32 = float(np.finfo(np.float32).eps)
SMALL = dict(vocab_size=40, d_model=32, max_seq_len=32)
# Per target format: a small model that computes what the original computes ...
CONFORMING = {
    "hrom": dict(SMALL, arch="decoder", family="hrom", n_layers=1, n_heads=2, d_ff=48, norm="layer", norm_eps=1e-5,
                 glu="sigmoid", rope_style="half", attn_bias=True, mlp_bias=True, head_bias=True, causal=True),
    "optimus_prime": dict(SMALL, arch="decoder", family="optimus_prime", n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48,
                          norm="rms", norm_eps=EPS_F32, rope_style="interleaved", glu="silu", mlp_bias=True,
                          causal=True),
    "yinggem": dict(SMALL, arch="decoder", family="yinggem", n_layers=1, n_heads=2, d_ff=48, norm="rms",
                    norm_eps=1e-6, rope_style="half", glu="sigmoid", attn_bias=True, mlp_bias=True, head_bias=True,
                    causal=False, attention_window=8),
    "hrm": dict(SMALL, arch="hrm", family="hrm", n_heads=2, l_layers=1, h_layers=1, expansion=4.0, mlp_rounding="int",
                halt_max_steps=2, causal=False, norm_position="post", q_head_pool="mean", act_batch_halt=True),
    "hrm_text1": dict(SMALL, arch="hrm_text1", family="hrm_text1", n_heads=4, n_layers=1, d_ff=48, halt_max_steps=2),
    "llama": dict(SMALL, arch="decoder", n_layers=1, n_heads=2, d_ff=48, norm="rms", glu="silu", causal=True),
}
# ... and one flag for which the original would compute something else.
DIFFERENT = {"hrom": ("norm_eps", 1e-6, 1e-5), "optimus_prime": ("rope_theta", 5e5, 1e4),
             "yinggem": ("causal", True, False), "hrm": ("causal", True, False), "hrm_text1": ("halt_eps", 1e-4, 1e-6),
             "llama": ("causal", False, True)}
FOLDER_FORMATS = ("hrm_text1", "llama")


def model_dir(path, model):
  """A model directory with random parameters on jaxlm's own tree (no init compile) and a char vocabulary."""
  rng = np.random.default_rng(0)
  params = {k: (float(k.endswith("scale")) + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            for k, shape in modeldir.expected_param_shapes(model).items()}
  chars = [chr(ord("!") + i) for i in range(model["vocab_size"])]
  return modeldir.save_model_dir(str(path), model, traverse_util.unflatten_dict(params, sep="/"),
                                 {"kind": "char", "chars": chars})


def different(family):
  flag, value, _ = DIFFERENT[family]
  return dict(CONFORMING[family], **{flag: value})


def listing(folder):
  """{relative path: bytes} of everything under folder."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out


def existing_target(path, family):
  """An earlier export at path (a file, or a folder for folder formats) that a refused export must leave alone."""
  if family in FOLDER_FORMATS:
    path.mkdir()
    (path / "config.json").write_text("earlier")
  else:
    path.write_bytes(b"earlier")


def error_line(capsys):
  """stderr's one 'error: ...' line, which must be its last line; no traceback."""
  err = capsys.readouterr().err
  assert "Traceback" not in err, err
  errors_ = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(errors_) == 1 and err.rstrip().splitlines()[-1] == errors_[0], err
  return errors_[0]


# ------------------------------------------------------------------------------------- different computation
@pytest.mark.parametrize("family", sorted(CONFORMING))
def test_a_model_the_original_computes_differently_is_refused_unless_allowed(family, tmp_path, capsys):
  flag, value, original = DIFFERENT[family]
  src = model_dir(tmp_path / "model", different(family))
  dest = tmp_path / "dest"
  dest.mkdir()
  out = dest / "exported"
  existing_target(out, family)
  before = listing(dest)
  args = ["jax2torch", "--src", src, "--out", str(out), "--family", family, "--overwrite"]

  assert main(args) == 2
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert err.startswith(f"error: {src}: the original ") and f"{flag}: {value!r} here, {original!r} in the original" \
      in err and differences.ALLOW_FLAG in err, err
  assert listing(dest) == before  # --out untouched, nothing beside it

  assert main(args + [differences.ALLOW_FLAG]) == 0
  captured = capsys.readouterr()
  assert captured.out.strip() == str(out)
  assert f"warning: exported with {differences.ALLOW_FLAG}" in captured.err
  record_path = differences.record_path(str(out), family in FOLDER_FORMATS)
  with open(record_path, encoding="utf-8") as f:
    record = json.load(f)
  assert record["format"] == family and differences.ALLOW_FLAG in record["note"]
  assert {k: (v["model"], v["original"]) for k, v in record["differences"].items()} == {flag: (value, original)}

  conforming = model_dir(tmp_path / "conforming", CONFORMING[family])  # no flag needed; the old record goes
  assert main(["jax2torch", "--src", conforming, "--out", str(out), "--family", family, "--overwrite"]) == 0
  assert not os.path.exists(record_path) and os.path.exists(out)


@pytest.mark.parametrize("family, changes, refused", [
    ("llama", dict(attention_window=32), None),                 # a window over the whole context: full attention
    ("llama", dict(attention_window=8), "attention_window"),   # HF Llama has no sliding window
    ("optimus_prime", dict(attention_window=16), "attention_window"),
    ("hrom", dict(attention_window=64, dropout=0.3), None),     # dropout is training only
    ("yinggem", dict(attention_window=0, norm_eps=1e-5), None),  # YingGemConfig values, set when loading
    ("hrm", dict(halt_max_steps=1, q_head_pool="token", act_batch_halt=False), None),  # one segment: no halting
    ("hrm", dict(q_head_pool="token"), "q_head_pool"),
    ("hrm", dict(train_mode="act", q_learning=True, init_state="learned", mlp_rounding="round"), None),
    ("hrm_text1", dict(ponder_loss="count", exit_over_padding=True, dropout=0.0), None),
])
def test_only_flags_that_change_the_forward_pass_count(family, changes, refused, tmp_path):
  src = model_dir(tmp_path / "model", dict(CONFORMING[family], **changes))
  out = str(tmp_path / "out")
  if refused:
    with pytest.raises(ConversionError, match=f"{refused}: "):
      api.jax2torch(src, out, family=family)
    assert not os.path.exists(out)
  else:
    api.jax2torch(src, out, family=family)
    assert not os.path.exists(differences.record_path(out, family in FOLDER_FORMATS))


def test_what_a_format_cannot_hold_is_refused_even_with_the_flag(tmp_path):
  src = model_dir(tmp_path / "model", dict(CONFORMING["hrm"], norm_position="pre"))
  with pytest.raises(ConversionError, match="model.norm_position is 'pre', but the HRM format can only hold 'post'"):
    api.jax2torch(src, str(tmp_path / "out.pt"), family="hrm", allow_different_computation=True)
  with pytest.raises(ConversionError, match="model.arch is 'hrm', but the Hugging Face Llama format"):
    api.jax2torch(src, str(tmp_path / "hf"), family="llama", allow_different_computation=True)
  assert sorted(os.listdir(tmp_path)) == ["model"]


# ------------------------------------------------------------------------------------- originals go back unchanged
PERTURBED = {"hrom": "hrom_20261125_133958_step0.pt", "optimus_prime": "best_model.pt", "yinggem": "yinggem_best.pth",
             "hrm": "hrm_continual_learning.pt", "hrm_text1": "pytorch_model.bin"}


@pytest.mark.parametrize("family", sorted(PERTURBED))
def test_perturbed_reference_round_trips_without_the_flag(family, tmp_path):
  folder = os.path.join(FIXTURES, family, "perturbed")
  src = folder if family == "hrm_text1" else os.path.join(folder, PERTURBED[family])
  imported = api.torch2jax(src, str(tmp_path / "model"), family=family)
  out = api.jax2torch(imported, str(tmp_path / "export") + os.sep)  # a folder: the original's own file names
  written = os.path.join(out, PERTURBED[family]) if family == "hrm_text1" else out
  assert_identical(torchfile.load(written), torchfile.load(os.path.join(folder, PERTURBED[family])))
  assert not [name for name in os.listdir(tmp_path / "export") if name.endswith(differences.SUFFIX)]


def test_hugging_face_llama_import_exports_back_without_the_flag(tmp_path):
  from convert import safetensors_file
  first = api.jax2torch(model_dir(tmp_path / "model", CONFORMING["llama"]), str(tmp_path / "hf"), family="llama")
  imported = api.torch2jax(first, str(tmp_path / "imported"))  # what torch2jax writes for a Llama folder
  again = api.jax2torch(imported, str(tmp_path / "again"))
  assert sorted(os.listdir(again)) == ["config.json", "model.safetensors"]
  assert_identical(safetensors_file.load(os.path.join(again, "model.safetensors")),
                   safetensors_file.load(os.path.join(first, "model.safetensors")))


# ------------------------------------------------------------------------------------- --out as a directory
def test_out_ending_in_a_separator_gets_the_original_file_name(tmp_path, capsys):
  src = model_dir(tmp_path / "model", CONFORMING["yinggem"])
  assert main(["jax2torch", "--src", src, "--out", str(tmp_path / "exported") + os.sep]) == 0
  assert capsys.readouterr().out.strip() == str(tmp_path / "exported" / "yinggem_best.pth")
  assert os.listdir(tmp_path / "exported") == ["yinggem_best.pth"]
  torchfile.load(str(tmp_path / "exported" / "yinggem_best.pth"))
  (tmp_path / "existing").mkdir()  # an existing directory, without the separator
  assert api.jax2torch(src, str(tmp_path / "existing")) == str(tmp_path / "existing" / "yinggem_best.pth")


def test_llama_out_ending_in_a_separator_is_the_folder(tmp_path, capsys):
  src = model_dir(tmp_path / "model", CONFORMING["llama"])
  assert main(["jax2torch", "--src", src, "--family", "llama", "--out", str(tmp_path / "hf") + os.sep]) == 0
  assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
  (tmp_path / "empty").mkdir()  # an existing empty folder is filled
  api.jax2torch(src, str(tmp_path / "empty") + os.sep, family="llama")
  assert sorted(os.listdir(tmp_path / "empty")) == ["config.json", "model.safetensors"]
  capsys.readouterr()
  assert main(["jax2torch", "--src", src, "--family", "llama", "--out", str(tmp_path / "hf") + os.sep]) == 2
  assert "already exists (pass --overwrite" in error_line(capsys)


# ------------------------------------------------------------------------------------- file-system failures
@pytest.fixture(scope="module")
def hrom_model(tmp_path_factory):
  return model_dir(tmp_path_factory.mktemp("hrom") / "model", CONFORMING["hrom"])


def deny_writes_under(monkeypatch, folder):
  """A read-only folder: chmod, and where that does not bind (root) os.mkdir under it fails with EACCES."""
  os.chmod(folder, 0o555)
  if os.geteuid() == 0:
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
      if os.path.dirname(os.path.abspath(path)) == str(folder):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
      return real_mkdir(path, *args, **kwargs)
    monkeypatch.setattr(os, "mkdir", mkdir)


def test_read_only_out_directory(hrom_model, tmp_path, capsys, monkeypatch):
  folder = tmp_path / "ro"
  folder.mkdir()
  deny_writes_under(monkeypatch, folder)
  try:
    assert main(["jax2torch", "--src", hrom_model, "--out", str(folder / "hrom.pt")]) == 1
    assert error_line(capsys) == f"error: {folder}: permission denied"
    assert os.listdir(folder) == []
  finally:
    os.chmod(folder, 0o755)


def test_out_under_a_file(hrom_model, tmp_path, capsys):
  (tmp_path / "file").write_text("x")
  assert main(["jax2torch", "--src", hrom_model, "--out", str(tmp_path / "file" / "sub" / "hrom.pt")]) == 1
  assert error_line(capsys) == f"error: {tmp_path / 'file'}: a path component is not a directory"
  assert main(["torch2jax", "--src", os.path.join(FIXTURES, "yinggem", "yinggem_best.pth"),
               "--out", str(tmp_path / "file" / "model")]) == 1
  assert error_line(capsys) == f"error: {tmp_path / 'file'}: a path component is not a directory"
  assert sorted(os.listdir(tmp_path)) == ["file"] and (tmp_path / "file").read_text() == "x"


def test_disk_full_names_out_and_leaves_nothing(hrom_model, tmp_path, capsys, monkeypatch):
  def full_disk(obj, path):  # a partial file, then the error a failed write() raises (no file name)
    with open(path, "wb") as f:
      f.write(b"PK\x03\x04partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(torchfile, "save", full_disk)
  out = tmp_path / "new" / "sub"
  assert main(["jax2torch", "--src", hrom_model, "--out", str(out / "hrom.pt")]) == 1
  assert error_line(capsys) == f"error: {out / 'hrom.pt'}: no space left on the device"
  assert os.listdir(tmp_path) == []  # the folders created on the way are gone again


@pytest.mark.parametrize("family", ["hrom", "llama"])  # torch's writer and the safetensors writer
def test_a_real_write_failure_names_out(family, tmp_path, capsys):
  resource = pytest.importorskip("resource")
  src = model_dir(tmp_path / "model", CONFORMING[family])
  out = tmp_path / "out"
  limits = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (2048, limits[1]))  # files stop at 2 KiB: EFBIG (Python ignores SIGXFSZ)
  try:
    code = main(["jax2torch", "--src", src, "--out", str(out), "--family", family])
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
  line = error_line(capsys)
  assert code == 1 and line.startswith(f"error: {out}"), line
  assert sorted(os.listdir(tmp_path)) == ["model"]


def test_unreadable_and_missing_src(tmp_path, capsys, monkeypatch):
  src = tmp_path / "yinggem_best.pth"
  shutil.copy(os.path.join(FIXTURES, "yinggem", "yinggem_best.pth"), src)
  os.chmod(src, 0)
  if os.geteuid() == 0:  # root reads anyway: the open fails as it would for anyone else
    real_open = io.open

    def denied(file, *args, **kwargs):
      if str(file) == str(src):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
      return real_open(file, *args, **kwargs)
    monkeypatch.setattr(io, "open", denied)
  assert main(["torch2jax", "--src", str(src), "--out", str(tmp_path / "model")]) == 1
  assert error_line(capsys) == f"error: {src}: permission denied"
  assert main(["torch2jax", "--src", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "model")]) == 2
  assert "absent.pt: no such file or directory" in error_line(capsys)
  assert main(["jax2torch", "--src", str(tmp_path / "absent"), "--out", str(tmp_path / "x.pt")]) == 2
  assert "absent is not a model directory" in error_line(capsys)
  assert sorted(os.listdir(tmp_path)) == ["yinggem_best.pth"]


def test_traceback_only_with_verbose(tmp_path, capsys, monkeypatch):
  args = ["torch2jax", "--src", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "model")]
  assert main(args + ["--verbose"]) == 2
  err = capsys.readouterr().err
  assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: ")
  monkeypatch.setenv("JAXLM_VERBOSE", "1")
  assert main(args) == 2
  assert "Traceback" in capsys.readouterr().err
