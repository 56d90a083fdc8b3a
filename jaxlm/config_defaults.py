"""Defaults every config file starts from. Family files in configs/ override what differs.

Sections: model (architecture + compatibility flags), data, opt, train, mesh.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections


def model_section(arch: str = "decoder") -> ml_collections.ConfigDict:
  """Every field of the architecture's config class with its default, so any of them can be overridden."""
  import jaxlm.models  # noqa: F401  (registers every architecture)
  from jaxlm.models import config_base
  if arch not in config_base._REGISTRY:
    raise ValueError(f"unknown model.arch {arch!r}; known: {sorted(config_base._REGISTRY)}")
  fields = config_base._REGISTRY[arch][0]().to_dict()
  fields["family"] = ""
  return ml_collections.ConfigDict(fields)


def base_config(arch: str = "decoder") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_section(arch)

  c.data = ml_collections.ConfigDict()
  c.data.corpus = "tinyshakespeare"     # shipped name, path or glob (.txt/.jsonl/.json.gz), a+b, or tfds:NAME
  c.data.text_field = "text"            # JSONL field holding the text
  c.data.format = "text"                # how records become text: text | dolly | dialogue
  c.data.tokenizer = "char"             # char | sentencepiece | gpt2 | ids
  c.data.tokenizer_path = ""            # .model file (sentencepiece) when not the shipped default
  c.data.vocab_size = 0                 # 0: the tokenizer's own size
  c.data.val_fraction = 0.1
  c.data.packing = "windows"            # windows (every offset) | documents (segment ids) | padded (a document a row)
  c.data.eval_batches = 0               # 0: the whole validation split
  c.data.cache_dir = ""                 # prepared datasets (python -m jaxlm.prepare); '' = ~/.cache/jaxlm/prepared
  c.data.tfds_data_dir = ""             # where tfds:NAME[/CONFIG][:VERSION] corpora are prepared; '' = ~/tensorflow_datasets
  c.data.min_chars = 0                  # drop documents shorter than this (characters)
  c.data.language = ""                  # keep only documents in this language ('en'; needs langdetect); '' = all
  c.data.loss_on = "all"                # all | response (assistant turns, Dolly responses)
  c.data.fraction = 1.0                 # share of the train split used
  c.data.mixture = ""                   # 'CORPUS=WEIGHT,CORPUS=WEIGHT' (replaces corpus); '' = data.corpus alone
  c.data.replay = 0.0                   # share of training examples replayed from earlier corpora (against forgetting)
  c.data.replay_corpus = ""             # 'a,b': what is replayed; '' = the corpora of train.init_from's history

  c.opt = ml_collections.ConfigDict()
  c.opt.name = "adamw"                  # adamw | adafactor | muon (block matrices; AdamW for the rest)
  c.opt.lr = 1e-3
  c.opt.schedule = "cosine"             # cosine | linear | constant | rsqrt_relative
  c.opt.warmup_steps = 100
  c.opt.min_lr_ratio = 0.1
  c.opt.b1 = 0.9
  c.opt.b2 = 0.99
  c.opt.eps = 1e-8
  c.opt.weight_decay = 0.1
  c.opt.weight_decay_on = "matrices"    # matrices | all
  c.opt.clip_norm = 1.0                 # 0 disables clipping
  c.opt.grad_accum = 1                  # microbatches per step (batch_size must divide)
  c.opt.adam_lr = 0.0                   # muon: AdamW's lr for embeddings, head, norms, biases; 0 = opt.lr
  c.opt.muon_momentum = 0.95            # muon: momentum of the orthogonalised updates

  c.train = ml_collections.ConfigDict()
  c.train.steps = 2000
  c.train.batch_size = 12
  c.train.seq_len = 64
  c.train.eval_every = 250
  c.train.save_every = 500
  c.train.log_every = 50
  c.train.batches_per_put = 1           # global batches read and placed on the devices at once, each step taking
                                        # its own there (on CPU a transfer a step costs the step's cores: 16 in
                                        # the CPU recipes); 1 = a batch a step
  c.train.eval_batch_size = 0           # windows per validation batch; 0 = batch_size
  c.train.eval_windows = 0              # evaluations during training read this many random validation windows
                                        # (the same each time); the last one reads all. 0 = all every time
  c.train.target_eval_loss = 0.0        # stop once the whole validation split's loss is <= this; 0 = off
  c.train.seed = 1337
  c.train.keep_checkpoints = 3          # last K kept; the best by eval loss is kept separately
  c.train.patience = 0                  # early stopping after this many evals without improvement; 0 = off
  c.train.sample_tokens = 200           # tokens generated at the end of training; 0 = none
  c.train.sample_prompt = "\n"
  c.train.sample_temperature = 0.8
  c.train.sample_every = 0              # also sample every N steps during training (printed, in metrics.jsonl); 0 = off
  c.train.progress = True               # tqdm progress bar
  c.train.on_nonfinite = "stop"         # a NaN/Inf loss or gradient: stop (exit 1) | skip (drop that update)
  c.train.on_unrestorable = "fail"      # no checkpoint restores (all damaged): fail | fresh (start over)
  c.train.init_from = ""                # model directory or workdir whose weights a new run starts from
  c.train.init_which = "latest"         # latest | best checkpoint of an init_from workdir
  c.train.init_optimizer = False        # also the init_from workdir's optimizer state (same arrays only)
  c.train.grow_every_chars = 0          # add train.grow_layers identity blocks every N characters (HRM: 3e6); 0 = off
  c.train.grow_layers = 1               # blocks per growth (HRM: to both the L and the H module)
  c.train.grow_reset_optimizer = False  # a growth restarts the optimizer state (the original) instead of keeping it
  c.train.on_new_corpus = "ask"         # a workdir / init_from model on a corpus it has not seen: continue | fresh |
                                        # ask (on a terminal; without one it continues)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                      # -1: every remaining device
  c.mesh.fsdp = 1
  c.mesh.model = 1
  c.mesh.rules = ()                     # () = sharding.DEFAULT_RULES
  c.mesh.cpu_devices = 1                # CPU only, one process: XLA devices (-1 = one per core; jaxlm/host_devices.py)
  c.mesh.grad_sum = "auto"              # CPU devices: auto | pairwise | collective (jaxlm/pairwise_sum.py)
  return c


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/yinggem.py:tiny' -> get_config('tiny') of that file (as config_flags does)."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  module_spec = importlib.util.spec_from_file_location(f"_jaxlm_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
