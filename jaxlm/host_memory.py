"""Keep freed heap memory in the process for training (glibc only).

XLA:CPU allocates each execution's temporaries as one block (yinggem:tiny's train step: ~50 MB on one device) and
frees it when the step ends. glibc hands blocks that large back to the kernel (mmap/munmap, heap trimming), so the
next step touches fresh pages: ~13.5k page faults a step, a third of yinggem:tiny's step on one CPU device (51 ms
against 37 ms with this on, bench/README.md). Here glibc serves no block from mmap (blocks too large for a
thread's heap still fall back to it) and trims the heap only past 1 GiB, so the block is reused by the next step.
The price: the process keeps its peak heap (up to that 1 GiB of free memory) until it exits, a peak a training
process reaches in its first steps anyway.

It must run before JAX starts its backend: set later, the step still page-faults (measured, bench/README.md), so
`python -m jaxlm.train` sets it first, whatever the backend (on GPU/TPU hosts it only concerns host memory).
JAXLM_KEEP_HEAP=0 turns it off. Nothing happens on other C libraries or operating systems.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

from jaxlm import compile_cache

log = logging.getLogger("jaxlm.host_memory")

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
MMAP_MAX = 0                # no block from mmap (the step's 50 MB exceeds the largest threshold glibc accepts)
MMAP_THRESHOLD = 32 << 20   # that largest threshold; setting it also stops glibc moving it by itself
TRIM_THRESHOLD = 1 << 30    # freed memory at the top of the heap stays mapped up to this much
TOP_PAD = 64 << 20          # each heap extension asks the kernel for this much more than needed


def _glibc():
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # glibc only (musl has no mallopt thresholds)
    return libc
  except (OSError, AttributeError):
    return None


def keep_freed_memory() -> bool:
  """Sets the thresholds; returns whether they took effect (False when off, or not glibc)."""
  if os.environ.get("JAXLM_KEEP_HEAP", "").lower() in compile_cache.OFF:
    return False
  libc = _glibc()
  if libc is None:
    return False
  applied = all(libc.mallopt(param, value) == 1 for param, value in (
      (M_MMAP_MAX, MMAP_MAX), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
      (M_TOP_PAD, TOP_PAD)))
  if not applied:
    log.info("glibc refused the heap thresholds; CPU steps may page-fault their temporaries back in")
  return applied
