"""Session-wide test settings.

Many tests train the same small models in this process; JAX's persistent compilation cache (in a fresh directory
per session, so nothing carries over between runs) lets a program compiled by one test be reused by the next
instead of compiled again. Subprocess tests share a cache of their own (tests/multiprocess.py).
"""
import errno
import os
import shutil
import tempfile

import jax
import pytest

_CACHE = tempfile.mkdtemp(prefix="jaxlm-test-session-cache-")
# Datasets training prepares (data.cache_dir unset) go to a session directory, not the user's cache; subprocess
# tests inherit it.
_DATA_CACHE = tempfile.mkdtemp(prefix="jaxlm-test-prepared-")
os.environ["JAXLM_DATA_CACHE"] = _DATA_CACHE
# Commands the tests start (python -m jaxlm.train) keep their compiled programs in this session's cache too.
os.environ["JAXLM_COMPILATION_CACHE"] = _CACHE
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_sessionfinish(session, exitstatus):
  shutil.rmtree(_CACHE, ignore_errors=True)
  shutil.rmtree(_DATA_CACHE, ignore_errors=True)


@pytest.fixture
def no_compilation_cache():
  """For tests that time compilation: every program really compiles."""
  jax.config.update("jax_enable_compilation_cache", False)
  yield
  jax.config.update("jax_enable_compilation_cache", True)


@pytest.fixture
def config_module(monkeypatch):
  """What the Optimus Prime code has importable when it torch.loads its checkpoint: config.TrainingConfig."""
  import dataclasses
  import sys
  import types
  module = types.ModuleType("config")

  @dataclasses.dataclass
  class TrainingConfig:
    batch_size: int = 8
  TrainingConfig.__module__ = "config"
  module.TrainingConfig = TrainingConfig
  monkeypatch.setitem(sys.modules, "config", module)
  return module


@pytest.fixture
def unreadable_config(monkeypatch):
  """make_unreadable(model_dir) -> the path of its config.json, which jaxlm.modeldir then cannot open
  (PermissionError), as on a directory without read permission (root ignores chmod)."""
  from jaxlm import modeldir
  real_open = open

  def make_unreadable(model_dir):
    config_json = os.path.join(model_dir, "config.json")

    def guarded_open(path, *args, **kwargs):
      if str(path) == config_json:
        raise PermissionError(errno.EACCES, "Permission denied", path)
      return real_open(path, *args, **kwargs)
    monkeypatch.setattr(modeldir, "open", guarded_open, raising=False)
    return config_json

  return make_unreadable
