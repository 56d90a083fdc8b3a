"""The restricted unpickler: nothing a checkpoint names gets imported or run; unknown classes load as records."""
import collections
import os
import pickle
import sys

import numpy as np
import pytest

from convert import jsonable, torchfile
from convert.unpickle import InertRecord, restricted_loads


class _SystemCall:
  """Pickles as a call to os.system, as a malicious checkpoint would."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class _EvalCall:
  def __reduce__(self):
    return (eval, ("__import__('os').system('echo should-not-run')",))


class TrainingConfig:  # stands in for Optimus Prime's config.TrainingConfig
  def __init__(self):
    self.batch_size, self.dataset_name = 8, "dolly"


def _marker_command(tmp_path):
  marker = tmp_path / "pwned"
  return marker, f"touch {marker}"


def test_reduce_to_os_system_does_not_run(tmp_path):
  marker, command = _marker_command(tmp_path)
  data = pickle.dumps({"payload": _SystemCall(command), "eval": _EvalCall()}, protocol=2)
  loaded = restricted_loads(data)
  assert not marker.exists()
  record = loaded["payload"]
  assert isinstance(record, InertRecord)
  assert record.global_name == "system" and record.global_module in ("posix", "nt", "os")
  assert record.args == (command,) and record.how == "call"
  assert isinstance(loaded["eval"], InertRecord) and loaded["eval"].qualname == "builtins.eval"


def test_unknown_class_is_an_inert_record_and_its_module_is_not_imported():
  config = TrainingConfig()
  data = pickle.dumps(config, protocol=2).replace(__name__.encode(), b"config_that_does_not_exist")
  assert "config_that_does_not_exist" not in sys.modules
  record = restricted_loads(data)
  assert "config_that_does_not_exist" not in sys.modules
  assert isinstance(record, InertRecord) and record.how == "new"
  assert record.qualname == "config_that_does_not_exist.TrainingConfig"
  assert record.state == {"batch_size": 8, "dataset_name": "dolly"}


def test_torch_checkpoint_with_a_malicious_entry(tmp_path):
  torch = pytest.importorskip("torch")
  marker, command = _marker_command(tmp_path)
  path = str(tmp_path / "evil.pt")
  torch.save({"model": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3).t()},
              "hook": _SystemCall(command), "config": TrainingConfig()}, path)
  loaded = torchfile.load(path)
  assert not marker.exists()
  assert isinstance(loaded["hook"], InertRecord) and loaded["hook"].args == (command,)
  assert isinstance(loaded["config"], InertRecord) and loaded["config"].state["batch_size"] == 8
  w = loaded["model"]["w"]  # a transposed (strided) tensor comes back as the same values, contiguous
  np.testing.assert_array_equal(w, np.arange(6, dtype=np.float32).reshape(2, 3).T)


def test_plain_data_round_trips_through_the_unpickler():
  value = collections.OrderedDict(a=(1, 2.5, "x"), b={3: [None, True]}, c=b"\x00\xff", d={1, 2})
  assert restricted_loads(pickle.dumps(value, protocol=2)) == value
  for protocol in (2, 5):  # numpy arrays and scalars have their own (allowed, data-only) rebuilders
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    loaded = restricted_loads(pickle.dumps({"a": array, "s": np.float64(1.25)}, protocol=protocol))
    np.testing.assert_array_equal(loaded["a"], array)
    assert loaded["s"] == 1.25 and isinstance(loaded["s"], np.float64)


def test_records_survive_json_and_write_back_under_their_original_name(tmp_path):
  torch = pytest.importorskip("torch")
  record = restricted_loads(pickle.dumps(TrainingConfig(), protocol=2).replace(__name__.encode(), b"config"))
  entry = {"config": record, "betas": (0.9, 0.999), "state": {0: {}}, "od": collections.OrderedDict(x=1)}
  decoded = jsonable.decode(jsonable.encode(entry))
  assert decoded == entry and type(decoded["od"]) is collections.OrderedDict
  path = str(tmp_path / "cfg.pt")
  torchfile.save({"config": decoded["config"]}, path)
  assert torchfile.load(path)["config"] == record
  with pytest.raises(pickle.UnpicklingError):  # torch's own safe loader sees the real global name
    torch.load(path, weights_only=True)
