"""python -m jaxlm.prepare --config configs/<family>.py[:<variant>] [--config.data.*=...] [--workers N]

Tokenizes the corpus the config's `data` section names into a prepared dataset under data.cache_dir (a TFDS
directory of ArrayRecord token shards, see jaxlm.data.prepared) and prints its directory. `jaxlm.train` with
the same config reads it and never tokenizes again; this command only does ahead of time what training would
do first. Already prepared: prints the directory and does nothing.
"""
import json
import logging
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/hrm_text1.py.", lock_config=True)
_WORKERS = flags.DEFINE_integer("workers", None, "Tokenizer processes (default: the CPU count for corpora over "
                                "32 MB, else none).")
_FORCE = flags.DEFINE_bool("force", False, "Prepare again even if a prepared dataset exists (replaces it).")
flags.DEFINE_bool("verbose", False, "On an error, print the traceback too (also: JAXLM_VERBOSE=1).")
flags.mark_flags_as_required(["config"])


def _prepare() -> int:
  from jaxlm import errors, validate
  from jaxlm.data import prepared, store
  for warning in validate.check_config(_CONFIG.value):
    logging.warning("config: %s", warning)
  data_cfg = _CONFIG.value.data
  started = time.perf_counter()
  found = prepared.find_all(data_cfg)
  if found and _FORCE.value:
    import shutil
    for root in found:
      shutil.rmtree(root)
    found = None
  if found:
    print("already prepared: " + " ".join(found), flush=True)
    return errors.EXIT_OK
  tokenizer = None
  for settings, _ in prepared.components(data_cfg):  # a mixture's components share the first one's tokenizer
    root = prepared.find(settings) or prepared.prepare(settings, tokenizer=tokenizer, workers=_WORKERS.value)
    tokenizer = tokenizer or prepared.load_tokenizer(root)
    with open(os.path.join(root, store.META_FILE), encoding="utf-8") as f:
      meta = json.load(f)
    print(f"prepared {meta['tokens']:,} tokens, {meta['documents']:,} documents of {settings['corpus']} "
          f"({meta['tokenizer']['kind']} tokenizer, vocab {meta['tokenizer']['vocab_size']}) in "
          f"{time.perf_counter() - started:.1f} s: {root}\nTFDS dataset: {store.tfds_dir(root)}", flush=True)
  return errors.EXIT_OK


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from jaxlm import errors
  sys.exit(errors.run_command(_prepare))


if __name__ == "__main__":
  app.run(main)
