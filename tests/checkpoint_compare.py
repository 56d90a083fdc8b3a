"""Bit-exact comparison of loaded checkpoints, shared by the converter round-trip tests."""
import numpy as np


def assert_identical(a, b, path="checkpoint"):
  """Same types, keys (in order), dtypes, shapes and bytes, recursively (and the state_dict _metadata)."""
  if isinstance(a, np.ndarray):
    assert isinstance(b, np.ndarray), path
    assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{path}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    assert a.tobytes() == b.tobytes(), f"{path}: values differ"
    return
  assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
  if isinstance(a, dict):
    assert list(a) == list(b), f"{path}: keys {list(a)} vs {list(b)}"
    for k in a:
      assert_identical(a[k], b[k], f"{path}[{k!r}]")
    assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), f"{path}: _metadata differs"
  elif isinstance(a, (list, tuple)):
    assert len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b)):
      assert_identical(x, y, f"{path}[{i}]")
  else:
    assert a == b, f"{path}: {a!r} vs {b!r}"
