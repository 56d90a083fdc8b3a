"""Multi-process building blocks on one process: which batch rows a process reads, resuming the data at a batch
position, distributed initialisation's arguments, and workdir files on gs:// paths (etils.epath mocked onto a
local directory; Orbax's own gs:// array I/O goes through tensorstore and is not exercised here)."""
import json

import jax
import numpy as np
import pytest
from etils.epath import testing as epath_testing
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlm import distributed, fs, metrics, sharding
from jaxlm.data import pipeline


def _take(it, k):
  return [next(it) for _ in range(k)]


def test_rows_of_every_process_put_together_are_the_global_batch():
  tokens = np.arange(500, dtype=np.int32)
  kwargs = dict(seq_len=8, batch_size=8, seed=3)
  whole = pipeline.train_dataset(tokens, **kwargs)
  parts = [pipeline.train_dataset(tokens, rows=rows, **kwargs) for rows in ([0, 1, 2, 3], [4, 5, 6, 7])]
  for b in range(5):
    glued = {k: np.concatenate([part[b][k] for part in parts]) for k in ("inputs", "targets", "weights")}
    for k in glued:
      np.testing.assert_array_equal(glued[k], whole[b][k])
  # Rows need not be contiguous: a process may hold rows 1 and 6 (what a TPU device order can give).
  odd = pipeline.train_dataset(tokens, rows=[1, 6], **kwargs)
  np.testing.assert_array_equal(odd[2]["inputs"], whole[2]["inputs"][[1, 6]])


def test_start_batch_resumes_the_same_stream():
  tokens = np.arange(300, dtype=np.int32)
  full = _take(pipeline.train_iterator(pipeline.train_dataset(tokens, seq_len=8, batch_size=4, seed=5)), 9)
  resumed = _take(pipeline.train_iterator(pipeline.train_dataset(tokens, seq_len=8, batch_size=4, seed=5,
                                                                 start_batch=6)), 3)
  for a, b in zip(full[6:], resumed):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_eval_rows_select_from_each_padded_batch():
  tokens = np.arange(1000, dtype=np.int32)
  whole = pipeline.eval_batches(tokens, seq_len=10, batch_size=8)
  mine = pipeline.eval_batches(tokens, seq_len=10, batch_size=8, rows=[4, 5, 6, 7])
  assert len(mine) == len(whole)
  for a, b in zip(whole, mine):
    np.testing.assert_array_equal(a["inputs"][4:], b["inputs"])
    np.testing.assert_array_equal(a["weights"][4:], b["weights"])


def test_process_rows_follow_the_sharding():
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  assert sharding.process_rows(NamedSharding(mesh, P("data")), 8) is None  # one process holds every row


def test_distributed_initialise_needs_all_three_flags_or_none(monkeypatch):
  monkeypatch.setattr(distributed, "detected_cluster", lambda: None)
  assert distributed.initialize() is False  # a plain machine stays single-process
  with pytest.raises(ValueError, match="go together"):
    distributed.initialize("localhost:1234", 2, None)
  with pytest.raises(ValueError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
    distributed.initialize("localhost:1234", 2, 2)


def test_stop_vote_with_one_process_is_the_local_flag():
  vote = distributed.StopVote()
  assert vote.vote(False) is False and vote.vote(True) is True


def test_remote_paths_are_kept_as_given(tmp_path):
  assert fs.absolute("gs://bucket/run") == "gs://bucket/run"
  assert fs.join("gs://bucket/run", "checkpoints") == "gs://bucket/run/checkpoints"
  assert fs.absolute("run") == str(tmp_path.cwd() / "run")


def test_metrics_on_a_gs_workdir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # the mock maps gs://bucket/... onto ./gs:/bucket/...
  with epath_testing.mock_epath():
    workdir = "gs://bucket/run"
    fs.makedirs(workdir)
    writer = metrics.MetricsWriter(workdir, remote_flush_secs=3600)
    writer.write({"step": 1, "loss": 3.0})
    writer.write({"step": 2, "loss": 2.5})
    assert fs.read_text(fs.join(workdir, "metrics.jsonl")) == ""  # buffered: objects cannot be appended to
    writer.close()
    assert [r["step"] for r in metrics.read_metrics(fs.join(workdir, "metrics.jsonl"))] == [1, 2]
    resumed = metrics.MetricsWriter(workdir, resume_step=1)  # rows past the restored step are dropped
    resumed.write({"step": 2, "loss": 2.4})
    resumed.close()
    rows = metrics.read_metrics(fs.join(workdir, "metrics.jsonl"))
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 3.0), (2, 2.4)]
    metrics.plot_loss_curve(fs.join(workdir, "metrics.jsonl"), fs.join(workdir, "loss_curve.png"))
    fs.write_json_atomic(fs.join(workdir, "config.json"), {"model": {"d_model": 8}})
    assert json.loads(fs.read_text(fs.join(workdir, "config.json"))) == {"model": {"d_model": 8}}
  assert (tmp_path / "gs:" / "bucket" / "run" / "loss_curve.png").stat().st_size > 1000


def test_tokenizer_round_trip_through_a_gs_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  local = tmp_path / "local"
  tok = pipeline.resolve_tokenizer({"corpus": "alice"}, str(local))
  with epath_testing.mock_epath():
    fs.copy_tree(str(local), "gs://bucket/run/tokenizer")
    copy = fs.local_dir("gs://bucket/run/tokenizer")
  from jaxlm.data import load_tokenizer
  assert copy != "gs://bucket/run/tokenizer"
  assert load_tokenizer(copy).encode("Alice") == tok.encode("Alice")


def test_a_truncated_last_metrics_line_is_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
  assert metrics.read_metrics(str(path)) == [{"step": 1, "loss": 2.0}]
  path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 2.0}\n')
  with pytest.raises(ValueError, match="line 1 is not JSON"):
    metrics.read_metrics(str(path))
