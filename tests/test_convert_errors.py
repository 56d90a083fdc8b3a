"""Bad input: errors name the file / key / shape at fault, and --out is written only on success."""
import collections
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from convert import __main__ as cli
from convert import api, torchfile
from convert.errors import ConversionError

pytest.importorskip("torch")  # writing test checkpoints uses torch.save

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
YINGGEM = os.path.join(FIXTURES, "yinggem", "yinggem_best.pth")
OPTIMUS = os.path.join(FIXTURES, "optimus_prime", "best_model.pt")
HROM = os.path.join(FIXTURES, "hrom", "hrom_20261125_133958_step0.pt")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def leftovers(folder):
  """Anything the converter left in `folder` (temporary stages are hidden dot-folders)."""
  return sorted(os.listdir(folder))


def edited_copy(src, dst, edit):
  """A copy of a checkpoint with `edit(obj)` applied, written by torch.save in the original layout."""
  obj = torchfile.load(src)
  edit(obj)
  torchfile.save(obj, str(dst))
  return str(dst)


@pytest.mark.parametrize("src", [YINGGEM, HROM])
def test_truncated_file_error_names_the_file(tmp_path, src):
  data = open(src, "rb").read()
  for cut in (len(data) // 2, len(data) - 30):
    bad = tmp_path / f"cut{cut}_{os.path.basename(src)}"
    bad.write_bytes(data[:cut])
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=f"{bad}: .*truncated"):
      api.torch2jax(str(bad), str(out))
    assert not out.exists()


def test_truncated_storage_record_is_reported(tmp_path):
  """A zip whose central directory survived but whose tensor bytes are short."""
  import zipfile
  bad = tmp_path / "short.pth"
  with zipfile.ZipFile(YINGGEM) as zin, zipfile.ZipFile(bad, "w") as zout:
    for info in zin.infolist():
      data = zin.read(info.filename)
      zout.writestr(info, data[: len(data) // 2] if info.filename.endswith("/data/3") else data)
  with pytest.raises(ConversionError, match=r"short\.pth: storage record .*data/3.* truncated"):
    torchfile.load(str(bad))


def test_wrong_shape_error_names_the_key(tmp_path):
  def shrink(state):
    state["block.1.attn.k_proj.weight"] = state["block.1.attn.k_proj.weight"][:, :60].copy()
  bad = edited_copy(YINGGEM, tmp_path / "yinggem_best.pth", shrink)
  with pytest.raises(ConversionError, match=r"'block\.1\.attn\.k_proj\.weight' has shape \(64, 60\), "
                                            r"expected \(64, 64\)"):
    api.torch2jax(bad, str(tmp_path / "out"))
  assert leftovers(tmp_path) == ["yinggem_best.pth"]


def test_missing_and_unexpected_tensors_are_named(tmp_path):
  def drop(obj):
    del obj["model_state_dict"]["layers.1.mlp.w3.bias"]
  bad = edited_copy(OPTIMUS, tmp_path / "missing.pt", drop)
  with pytest.raises(ConversionError, match=r"missing tensor 'layers\.1\.mlp\.w3\.bias'"):
    api.torch2jax(bad, str(tmp_path / "out"), num_heads=4)

  def add(obj):
    obj["model"]["blocks.0.attn.extra"] = np.zeros(3, np.float32)
  bad = edited_copy(HROM, tmp_path / "extra.pt", add)
  with pytest.raises(ConversionError, match=r"unexpected key 'blocks\.0\.attn\.extra'"):
    api.torch2jax(bad, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_existing_out_is_left_untouched(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(ConversionError, match="already exists"):
    api.torch2jax(YINGGEM, str(out))
  assert leftovers(out) == ["keep.txt"]
  api.torch2jax(YINGGEM, str(out), overwrite=True)  # --overwrite replaces it whole
  assert leftovers(out) == ["config.json", "params", "tokenizer.json"]
  shutil.rmtree(out)
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  # jax2torch: a failing export leaves neither the target nor a temporary file behind
  model_dir = api.torch2jax(HROM, str(tmp_path / "hrom"))
  with pytest.raises(ConversionError, match="model.norm"):
    api.jax2torch(model_dir, str(tmp_path / "x.pth"), family="yinggem")
  assert leftovers(tmp_path) == ["hrom", "out"]


def test_unknown_family_and_undetectable_file(tmp_path):
  with pytest.raises(ConversionError, match="unknown family 'gpt9'"):
    api.torch2jax(YINGGEM, str(tmp_path / "out"), family="gpt9")
  other = tmp_path / "other.pt"
  torchfile.save(collections.OrderedDict(weight=np.ones(3, np.float32)), str(other))
  with pytest.raises(ConversionError, match=r"other\.pt: cannot tell the family"):
    api.torch2jax(str(other), str(tmp_path / "out"))
  with pytest.raises(ConversionError, match="no such file"):
    api.torch2jax(str(tmp_path / "absent.pt"), str(tmp_path / "out"))
  assert leftovers(tmp_path) == ["other.pt"]


def test_family_is_detected_from_the_file(tmp_path):
  for src, family in ((HROM, "hrom"), (OPTIMUS, "optimus_prime"), (YINGGEM, "yinggem")):
    assert api.detect(src)[0].name == family


def test_optimus_heads_from_flag_override_and_default(tmp_path, capsys):
  # No config.json beside the file: the original default (8 heads) is used and a note says so.
  lone = tmp_path / "lone"
  lone.mkdir()
  shutil.copy(OPTIMUS, lone / "best_model.pt")
  from jaxlm import modeldir
  out = api.torch2jax(str(lone / "best_model.pt"), str(tmp_path / "default"))
  assert modeldir.read_config(out)["model"]["n_heads"] == 8
  assert "--num-heads" in capsys.readouterr().err
  out = api.torch2jax(str(lone / "best_model.pt"), str(tmp_path / "flag"), num_heads=4)
  assert modeldir.read_config(out)["model"]["n_kv_heads"] == 2
  with pytest.raises(ConversionError, match="3 heads"):
    api.torch2jax(str(lone / "best_model.pt"), str(tmp_path / "bad"), num_heads=3)


def test_cli_end_to_end_and_error_exit(tmp_path, capsys):
  out = tmp_path / "m"
  assert cli.main(["torch2jax", "--src", YINGGEM, "--out", str(out)]) == 0
  assert cli.main(["jax2torch", "--src", str(out), "--out", str(tmp_path / "y.pth")]) == 0
  assert cli.main(["torch2jax", "--src", YINGGEM, "--out", str(out)]) == 2
  assert "already exists" in capsys.readouterr().err
  result = subprocess.run([sys.executable, "-m", "convert", "torch2jax", "--help"], cwd=REPO,
                          capture_output=True, text=True, check=True)
  assert "--num-heads" in result.stdout and "--attention-window" in result.stdout and "else 8" in result.stdout


def test_truncated_safetensors_names_the_file_and_tensor(tmp_path):
  from convert import safetensors_file
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text('{"model_type": "llama", "vocab_size": 8, "hidden_size": 4, "intermediate_size": 4, '
                                  '"num_hidden_layers": 0, "num_attention_heads": 1, "tie_word_embeddings": true}')
  safetensors_file.save({"model.embed_tokens.weight": np.ones((8, 4), np.float32),
                         "model.norm.weight": np.ones(4, np.float32)}, str(hf / "model.safetensors"))
  data = (hf / "model.safetensors").read_bytes()
  (hf / "model.safetensors").write_bytes(data[:-10])
  with pytest.raises(ConversionError, match=r"model\.safetensors: tensor '.*' ends at byte .*truncated"):
    api.torch2jax(str(hf), str(tmp_path / "out"), family="llama")
  (hf / "model.safetensors").write_bytes(data[:5])
  with pytest.raises(ConversionError, match=r"model\.safetensors: truncated"):
    api.torch2jax(str(hf), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
