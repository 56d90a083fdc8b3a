"""Corpora, tokenizers and Grain input pipelines; `build_data` is the trainer's entry point."""
from jaxlm.data import prepared
from jaxlm.data.pipeline import (DataBundle, build_data, build_prepared_data, default_data_config,
                                  resolve_tokenizer, run_tokenizer)
from jaxlm.data.tokenizers import Tokenizer, load_tokenizer, make_tokenizer

__all__ = ["DataBundle", "Tokenizer", "build_data", "build_prepared_data", "prepared", "run_tokenizer", "default_data_config", "load_tokenizer", "make_tokenizer", "resolve_tokenizer"]
