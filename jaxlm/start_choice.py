"""The HRM original's two questions, asked only on a terminal:

- at start, when a workdir or a `train.init_from` model is trained on a corpus its history does not list:
  "continue this model / start fresh", after a summary of the model (datasets, vocabulary, parameters, last
  update). `train.on_new_corpus=continue|fresh|ask` answers it without asking; `ask` without a terminal on
  stdin continues (and says so), so piped stdin never blocks.
- after Ctrl-C: "pause" (the checkpoint is saved; rerun the command to resume) or "stop" (saved, and the stage
  is recorded as finished). Without a terminal it pauses, as before.

Process 0 asks; every process takes its answer (a broadcast), so all of them do the same.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence

log = logging.getLogger("jaxlm.train")

CHOICES = ("continue", "fresh", "ask")


def corpora(history: Sequence[Mapping[str, Any]]) -> List[str]:
  return [str(e.get("corpus")) for e in history if e.get("corpus")]


def is_new_corpus(history: Sequence[Mapping[str, Any]], corpus: str) -> bool:
  """True when the model has a history and `corpus` is not in it (a model with no record is not asked about)."""
  return bool(history) and str(corpus) not in corpora(history)


def summary(path: str, history: Sequence[Mapping[str, Any]], vocab_size: Optional[int],
            params: Optional[int]) -> str:
  last = history[-1] if history else {}
  updated = last.get("finished") or last.get("started") or "unknown"
  names = ", ".join(corpora(history)) or "none recorded"
  return (f"model {path}\n  datasets trained: {names}\n  vocabulary: {vocab_size if vocab_size else '?'} tokens\n"
          f"  parameters: {f'{params:,}' if params else '?'}\n  last update: {updated}")


def ask(question: str, options: Dict[str, str], default: str, stdin=None, out=None) -> Optional[str]:
  """The option the user picks on a terminal ('' picks `default`; keys are matched by their first letter);
  None when stdin is not a terminal (nothing is read, nothing blocks). End of input picks the default."""
  stdin, out = stdin or sys.stdin, out or sys.stderr
  if not (hasattr(stdin, "isatty") and stdin.isatty()):
    return None
  menu = " / ".join(f"[{k[0]}]{k[1:]}: {v}" for k, v in options.items())
  while True:
    out.write(f"{question}\n  {menu} (default {default}) > ")
    out.flush()
    line = stdin.readline()
    if not line:
      return default
    answer = line.strip().lower()
    if not answer:
      return default
    for key in options:
      if key.startswith(answer) or answer[0] == key[0]:
        return key
    out.write(f"  please answer one of {', '.join(options)}\n")


def agree(answer: str, options: Sequence[str]) -> str:
  """Process 0's `answer`, on every process."""
  import jax
  if jax.process_count() == 1:
    return answer
  import numpy as np
  from jax.experimental import multihost_utils
  index = multihost_utils.broadcast_one_to_all(np.int32(list(options).index(answer)))
  return list(options)[int(index)]


def at_start(setting: str, corpus: str, path: str, history, vocab_size, params, *, primary: bool,
             stdin=None, out=None) -> str:
  """'continue' or 'fresh' for a model (workdir or parent) at `path` about to train on `corpus`."""
  if setting not in CHOICES:
    raise ValueError(f"train.on_new_corpus must be one of {', '.join(CHOICES)}, got {setting!r}")
  answer = "continue"
  if setting != "ask":
    answer = setting if is_new_corpus(history, corpus) or setting == "continue" else "continue"
  elif primary and is_new_corpus(history, corpus):
    text = summary(path, history, vocab_size, params)
    picked = ask(f"{text}\nThis model has not seen {corpus!r}.",
                 {"continue": "train this model on it", "fresh": "start a new model"}, "continue", stdin, out)
    if picked is None:
      log.info("%s has not been trained on %r; continuing it (no terminal to ask; set "
               "train.on_new_corpus=fresh to start a new model)", path, corpus)
    answer = picked or "continue"
  return agree(answer, ("continue", "fresh"))


def after_interrupt(*, primary: bool, stdin=None, out=None) -> str:
  """'pause' or 'stop' after Ctrl-C / SIGTERM (the checkpoint is already saved)."""
  answer = "pause"
  if primary:
    answer = ask("Training interrupted; the checkpoint is saved.",
                 {"pause": "exit; rerun the same command to resume", "stop": "exit and record this stage as "
                  "finished"}, "pause", stdin, out) or "pause"
  return agree(answer, ("pause", "stop"))
