"""Corpora, tokenizers, prepared datasets and Grain input pipelines; `build_prepared_data` is what training reads.

Names are imported on first use, so a tokenizer worker process (jaxlm.data.tokenize_pool) does not pay for Grain.
"""
import importlib

_EXPORTS = {
    "DataBundle": "pipeline", "build_data": "pipeline", "build_prepared_data": "pipeline",
    "default_data_config": "pipeline", "resolve_tokenizer": "pipeline", "run_tokenizer": "pipeline",
    "Tokenizer": "tokenizers", "load_tokenizer": "tokenizers", "make_tokenizer": "tokenizers",
}
__all__ = sorted(_EXPORTS) + ["prepared"]


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"jaxlm.data.{_EXPORTS[name]}"), name)
  if name == "prepared":
    return importlib.import_module("jaxlm.data.prepared")
  raise AttributeError(f"module 'jaxlm.data' has no attribute {name!r}")
