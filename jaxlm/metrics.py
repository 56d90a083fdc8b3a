"""Run metrics: metrics.jsonl (one JSON object per logged step), TensorBoard events and loss_curve.png.

Only the primary process of a run writes them. A local metrics.jsonl is appended to row by row; on Cloud Storage,
where objects cannot be appended to, the whole file is rewritten at most every `remote_flush_secs` and at close.
"""
from __future__ import annotations

import io
import json
import logging
import sys
import time
from typing import Dict, List

from jaxlm import fs


class MetricsWriter:
  """Appends rows to DIR/metrics.jsonl and TensorBoard; on resume drops rows past the restored step."""

  def __init__(self, workdir: str, resume_step: int = 0, remote_flush_secs: float = 30.0):
    self.path = fs.join(workdir, "metrics.jsonl")
    self._remote = fs.is_remote(self.path)
    self._rows = self._kept_rows(resume_step)
    self._flush_secs, self._flushed_at = remote_flush_secs, time.monotonic()
    fs.write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self._rows))
    self._file = None if self._remote else open(self.path, "a", encoding="utf-8")
    self._tb = _tensorboard(fs.join(workdir, "tensorboard"))

  def _kept_rows(self, step: int) -> List[Dict]:
    if not fs.exists(self.path):
      return []
    return [r for r in read_metrics(self.path) if r.get("step", 0) <= step]

  def write(self, row: Dict) -> None:
    if self._remote:
      self._rows.append(row)
      if time.monotonic() - self._flushed_at >= self._flush_secs:
        self._flush_remote()
    else:
      self._file.write(json.dumps(row) + "\n")
      self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, row["step"])

  def _flush_remote(self) -> None:
    fs.write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self._rows))
    self._flushed_at = time.monotonic()

  def close(self) -> None:
    if self._remote:
      self._flush_remote()
    else:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def _tensorboard(logdir: str):
  """A tensorboardX SummaryWriter, or None (with a warning) where it cannot write: the JSONL file is the record."""
  summary_writer = _summary_writer_class()
  if summary_writer is None:
    return None
  if logdir.startswith("gs://"):
    try:  # tensorboardX's Cloud Storage writer needs it (and fails untidily without it)
      import google.cloud.storage  # noqa: F401
    except ImportError:
      logging.getLogger("jaxlm.metrics").warning(
          "no TensorBoard events in %s: install google-cloud-storage (pip install 'jaxlm[gcs]')", logdir)
      return None
  try:
    return summary_writer(logdir)
  except (ImportError, OSError) as e:  # e.g. gs:// without google-cloud-storage
    logging.getLogger("jaxlm.metrics").warning("no TensorBoard events in %s: %s", logdir, e)
    return None


def _summary_writer_class():
  """tensorboardX's SummaryWriter, or None without tensorboardX (the JSONL file is the record).

  tensorboardX imports torch when it is installed, only to accept torch tensors (2+ s of start-up); we log
  floats, so torch is hidden from that import unless something already loaded it.
  """
  hide_torch = "torch" not in sys.modules
  if hide_torch:
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  except ImportError:
    return None
  finally:
    if hide_torch:
      del sys.modules["torch"]


def read_metrics(path: str) -> List[Dict]:
  """The rows of a metrics.jsonl; a last line cut short (a process killed while writing it) is dropped."""
  lines = [line for line in fs.read_text(str(path)).splitlines() if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
  return rows


def plot_loss_curve(metrics_path: str, out_path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = read_metrics(metrics_path)
  train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
  if not train and not evals:
    return
  fig, ax = plt.subplots(figsize=(7, 4))
  if train:
    ax.plot(*zip(*train), label="train loss")
  if evals:
    ax.plot(*zip(*evals), "o-", label="validation loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  fs.write_bytes_atomic(str(out_path), png.getvalue())
