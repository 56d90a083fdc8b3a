"""What every jaxlm command does with a failure: one line that names the path and the problem, and an exit code a
scheduler can act on. The traceback is printed too with `--verbose` or `JAXLM_VERBOSE=1`.

Exit codes: 0 finished; 1 a failure while running (file system, divergence, a damaged checkpoint); 2 bad input
(a config value, a missing or malformed file, a wrong argument); 75 (EX_TEMPFAIL, "try again") interrupted after
saving, so rerunning the same command resumes; 130 aborted by a second Ctrl-C, nothing saved since the last
checkpoint.
"""
from __future__ import annotations

import errno
import gc
import logging
import os
import re
import sys
import threading
import traceback
import warnings
from typing import Callable, Optional, Sequence, Tuple

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 75
EXIT_ABORTED = 130

_OS_PROBLEMS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a path component is not a directory",
    errno.EISDIR: "is a directory",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files",
    errno.EIO: "input/output error",
}


def verbose_requested(argv: Optional[Sequence[str]] = None) -> bool:
  argv = sys.argv if argv is None else argv
  return "--verbose" in argv or os.environ.get("JAXLM_VERBOSE", "") not in ("", "0")


def os_error_line(e: OSError) -> str:
  """'PATH: problem' for an OSError, whatever wrapped it (a path may be None for errors without one)."""
  problem = _OS_PROBLEMS.get(e.errno, e.strerror or str(e))
  paths = [p for p in (e.filename, getattr(e, "filename2", None)) if p]
  return f"{' -> '.join(map(str, paths))}: {problem}" if paths else problem


# Tensorstore (under Orbax) reports file-system failures as ValueError text: '... "PATH" ... [os_error_code=28]'.
_OS_CODE = re.compile(r"os_error_code=\W*(\d+)")
_QUOTED_PATH = re.compile(r'"((?:/|[a-z]+://)[^"]+)"')


def _embedded_os_error(e: BaseException) -> Optional[Tuple[str, int]]:
  """(path, errno) named in the text of a library's error, or None."""
  text = str(e)
  code = _OS_CODE.search(text)
  if code is None:
    return None
  paths = _QUOTED_PATH.findall(text[:code.start()])
  return (paths[-1] if paths else ""), int(code.group(1))


def _root_os_error(e: BaseException) -> Optional[OSError]:
  """The OSError behind `e` (libraries wrap them in their own exceptions), or None."""
  return next((x for x in _chain(e) if isinstance(x, OSError) and x.errno is not None), None)


def describe(e: BaseException) -> str:
  """One line for any exception: file-system problems name the path, the rest say what they say."""
  os_error = _root_os_error(e)
  if os_error is not None and (os_error.filename or os_error is e):
    return os_error_line(os_error)
  if os_error is not None:  # no path in the OSError: the message that wrapped it says where
    return f"{_first_line(e)}: {os_error_line(os_error)}"
  chain = _chain(e)
  embedded = next((found for found in map(_embedded_os_error, chain) if found), None)
  if embedded is not None:
    path, code = embedded
    line = os_error_line(OSError(code, os.strerror(code), path or None))
    return line if chain[0] is not None and _embedded_os_error(e) else f"{_first_line(e)}: {line}"
  return _first_line(e)


def _chain(e: BaseException) -> list:
  """`e` and the exceptions that caused it, outermost first (respecting `raise ... from None`)."""
  chain, seen = [], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    chain.append(e)
    e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
  return chain


def root_cause(e: BaseException) -> str:
  """One line for the innermost exception behind `e`: what a library's wrapper ("error while reading array
  index") was caused by ("OUT_OF_RANGE: Error reading ... file ...")."""
  return describe(_chain(e)[-1])


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  line = text[0] if text else type(e).__name__
  return line.split(" See full TensorStore details")[0]  # the rest is a dump of the store's spec


def exit_code(e: BaseException) -> int:
  """2 for bad input, 1 for a failure while running."""
  if ((_root_os_error(e) is not None and not isinstance(e, FileNotFoundError))
      or any(map(_embedded_os_error, _chain(e)))):
    return EXIT_FAILURE
  if isinstance(e, (ValueError, FileNotFoundError, KeyError, TypeError)):
    return EXIT_USAGE
  return EXIT_FAILURE


class _QuietReports(logging.Filter):
  """Without --verbose, a failure is reported once, by the command: log records lose their tracebacks and extra
  lines, libraries' error records and the exceptions background threads print (Orbax's writers print dozens
  after a disk fills up) are counted instead of shown."""

  def __init__(self):
    super().__init__()
    self.hidden = 0

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and not record.name.startswith("jaxlm"):
      self.hidden += 1
      return False
    first = (record.getMessage().strip().splitlines() or [""])[0]
    record.msg, record.args, record.exc_info, record.exc_text, record.stack_info = first, None, None, None, None
    return True

  def hide(self, *unused) -> None:
    self.hidden += 1

  def install(self) -> None:
    self._handlers = list(logging.getLogger().handlers)
    self._hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook)
    for handler in self._handlers:
      handler.addFilter(self)
    sys.excepthook = self.hide  # what C extensions' callbacks print through PyErr_Print
    threading.excepthook = self.hide
    sys.unraisablehook = self.hide
    self._warnings = warnings.catch_warnings()
    self._warnings.__enter__()
    # Abandoned reads of a damaged checkpoint leave coroutines that Python warns about when they are collected.
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)

  def uninstall(self) -> None:
    for handler in self._handlers:
      handler.removeFilter(self)
    sys.excepthook, threading.excepthook, sys.unraisablehook = self._hooks
    self._warnings.__exit__(None, None, None)


def run_command(main: Callable[[], int], argv: Optional[Sequence[str]] = None) -> int:
  """Runs a command's main; any exception becomes 'error: ...' on stderr and an exit code."""
  quiet = None
  if not verbose_requested(argv):
    quiet = _QuietReports()
    quiet.install()
  try:
    return main()
  except KeyboardInterrupt:
    print("error: aborted (Ctrl-C)", file=sys.stderr)
    return EXIT_ABORTED
  except SystemExit:
    raise
  except BaseException as e:  # noqa: BLE001: every failure of a command ends the same way
    if quiet is None:
      traceback.print_exc()
    print(f"error: {describe(e)}", file=sys.stderr)
    return exit_code(e)
  finally:
    if quiet is not None:
      gc.collect()  # failed asynchronous writes report themselves when collected: while the filter still counts
      quiet.uninstall()
      if quiet.hidden:
        print(f"({quiet.hidden} error report(s) from libraries and background threads hidden; --verbose or "
              "JAXLM_VERBOSE=1 shows them)", file=sys.stderr)
