"""One run per workdir: a lock file that says who holds it, and that a dead holder's lock can be taken over.

`workdir/jaxlm.lock` holds the holder's host, PID (and, on Linux, the PID's start time, so a recycled PID is
not mistaken for the holder), the start time and a heartbeat that a background thread refreshes. A lock is
stale when its holder is a dead process on this host, or when its heartbeat is older than `stale_after_s`
(a holder on another host that stopped refreshing). Only the primary process of a multi-process run takes the
lock; the run's other processes share it. Locally the file is created with O_EXCL; on Cloud Storage (no
exclusive create) the holder writes, then reads back its own token, which narrows the race to the write.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Dict, Optional

from jaxlm import fs

LOCK_FILE = "jaxlm.lock"
log = logging.getLogger("jaxlm.lock")


class WorkdirLocked(RuntimeError):
  """Another live run holds the workdir."""


def _proc_start_ticks(pid: int) -> Optional[int]:
  """The start time of `pid` in clock ticks since boot (Linux), or None where /proc does not say."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[19])  # field 22 of stat; the split dropped the first two
  except (OSError, IndexError, ValueError):
    return None


def _alive(pid: int, start_ticks: Optional[int]) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return start_ticks is None or _proc_start_ticks(pid) in (None, start_ticks)


class WorkdirLock:
  """`acquire()` or raise WorkdirLocked naming the holder; `release()` removes the file if it is still ours."""

  def __init__(self, workdir: str, stale_after_s: float = 600.0, heartbeat_s: float = 30.0):
    self.path = fs.join(workdir, LOCK_FILE)
    self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
    pid = os.getpid()
    self.record = {"host": socket.gethostname(), "pid": pid, "pid_start": _proc_start_ticks(pid),
                   "token": uuid.uuid4().hex, "started": time.time(), "heartbeat": time.time()}
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  # ---------------------------------------------------------------------------------------------- reading
  def holder(self) -> Optional[Dict[str, Any]]:
    """The current lock record, {} for an unreadable one, None if there is no lock."""
    try:
      return json.loads(fs.read_text(self.path))
    except FileNotFoundError:
      return None
    except (ValueError, OSError):
      return {}

  def _stale_reason(self, holder: Dict[str, Any]) -> Optional[str]:
    if not holder:
      return "unreadable lock file"
    age = time.time() - float(holder.get("heartbeat", 0))
    if holder.get("host") == self.record["host"]:
      if not _alive(int(holder.get("pid", -1)), holder.get("pid_start")):
        return f"process {holder.get('pid')} on this host is gone"
      return None
    if age > self.stale_after_s:
      return f"no heartbeat from host {holder.get('host')} for {age:.0f} s"
    return None

  # ---------------------------------------------------------------------------------------------- taking
  def acquire(self) -> None:
    for _ in range(3):
      if self._create():
        self._start_heartbeat()
        return
      holder = self.holder()
      if holder is None:  # released in between: try again
        continue
      reason = self._stale_reason(holder)
      if reason is None:
        raise WorkdirLocked(_describe_holder(self.path, holder))
      log.warning("taking over the stale lock %s (%s)", self.path, reason)
      self._remove()
    raise WorkdirLocked(f"{self.path}: could not take the lock (another run keeps taking it)")

  def _create(self) -> bool:
    data = json.dumps(self.record)
    if fs.is_remote(self.path):
      if fs.exists(self.path):
        return False
      fs.write_text_atomic(self.path, data)
      return (self.holder() or {}).get("token") == self.record["token"]
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(data)
    return True

  def _remove(self) -> None:
    try:
      if fs.is_remote(self.path):
        from etils import epath
        epath.Path(self.path).unlink()
      else:
        os.remove(self.path)
    except FileNotFoundError:
      pass

  # ---------------------------------------------------------------------------------------------- holding
  def _start_heartbeat(self) -> None:
    self._thread = threading.Thread(target=self._beat, name="jaxlm-lock-heartbeat", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      if (self.holder() or {}).get("token") != self.record["token"]:
        log.error("the workdir lock %s was taken by another run", self.path)
        return
      self.record["heartbeat"] = time.time()
      try:
        fs.write_text_atomic(self.path, json.dumps(self.record))
      except OSError as e:  # a full disk must not kill the run from this thread
        log.warning("cannot refresh the workdir lock %s: %s", self.path, e)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
      self._thread = None
      if (self.holder() or {}).get("token") == self.record["token"]:
        self._remove()


def _describe_holder(path: str, holder: Dict[str, Any]) -> str:
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
  return (f"the workdir is in use by process {holder.get('pid')} on host {holder.get('host')} (started {started}; "
          f"lock {path}); wait for that run, stop it, or use another --workdir. If that run is dead, delete the "
          f"lock file")
