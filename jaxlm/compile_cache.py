"""JAX's persistent compilation cache, on by default for jaxlm's commands: a rerun (a resumed run, the same
config again, generate after train) loads its compiled programs instead of compiling them.

The cache lives in $JAXLM_COMPILATION_CACHE, else $XDG_CACHE_HOME/jaxlm/xla (~/.cache/jaxlm/xla); JAXLM_COMPILATION_CACHE=0
turns it off. A cache directory already chosen (JAX_COMPILATION_CACHE_DIR, jax.config) is left as it is.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

log = logging.getLogger("jaxlm.compile_cache")
OFF = ("0", "off", "false", "no")
# Programs that compile faster than this are not worth a file (JAX's default is 1 s; the tiny configs' evaluation
# and sampling programs take 0.2-0.8 s, which a short run pays at every start).
MIN_COMPILE_SECONDS = 0.1


def default_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxlm", "xla")


def enable() -> Optional[str]:
  """Turns the cache on (before the first compilation); returns its directory, or None when it is off."""
  import jax
  setting = os.environ.get("JAXLM_COMPILATION_CACHE", "")
  if setting.lower() in OFF:
    return None
  chosen = jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if chosen:
    return chosen
  path = setting or default_dir()
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:  # a read-only home: run without the cache rather than not at all
    log.warning("compilation cache off: cannot create %s (%s)", path, e)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return path
