"""Converters between the original PyTorch checkpoints and jaxlm model directories.

  python -m convert torch2jax [--family F] --src PATH --out DIR
  python -m convert jax2torch --src DIR --out PATH [--family F]

One module per format (hrom, optimus_prime, yinggem, llama, hrm, hrm_text1), each registering a `family.Family`
and describing its tensors once, as a `table.Table` that its read, its write and its shape check all use.
Checkpoints are read without torch and without executing pickled code (see unpickle.py, torchfile.py).
"""
from convert import hrom, llama, optimus_prime, yinggem  # noqa: F401  (each registers its family)
from convert import hrm_text1  # noqa: F401
from convert import hrm  # noqa: F401
from convert.errors import ConversionError
from convert.family import FAMILIES

__all__ = ["ConversionError", "FAMILIES"]
