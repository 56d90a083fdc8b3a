"""Keep freed heap memory in the process during CPU training (glibc only).

XLA:CPU allocates each execution's temporaries as one block (yinggem:tiny's train step: 50 MB on one device) and
frees it when the step ends. glibc hands blocks that large back to the kernel (mmap/munmap, heap trimming), so the
next step touches fresh pages and takes ~12k page faults: a third of yinggem:tiny's step on one CPU device
(51 ms against 36 ms with this on, bench/README.md). Raising glibc's mmap and trim thresholds keeps the block in
the heap for the next step. The price is that the process keeps its peak heap until it exits, which a training
process reaches in its first step anyway.

JAXLM_KEEP_HEAP=0 turns it off. Nothing happens on other C libraries or operating systems.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger("jaxlm.host_memory")

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
MMAP_THRESHOLD = 32 << 20   # glibc's largest accepted value (HEAP_MAX_SIZE / 2 on 64-bit)
MMAP_MAX = 0                # no block at all from mmap: the step's 50 MB exceeds any threshold
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
  if os.environ.get("JAXLM_KEEP_HEAP", "").lower() in ("0", "off", "false", "no"):
    return False
  libc = _glibc()
  if libc is None:
    return False
  applied = all(libc.mallopt(param, value) == 1 for param, value in (
      (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_MMAP_MAX, MMAP_MAX), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
      (M_TOP_PAD, TOP_PAD)))
  if not applied:
    log.info("glibc refused the heap thresholds; CPU steps may page-fault their temporaries back in")
  return applied
