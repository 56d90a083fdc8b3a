"""What every jaxlm command does with a failure: one line that names the path and the problem, and an exit code a
scheduler can act on. The traceback is printed too with `--verbose` or `JAXLM_VERBOSE=1`.

Exit codes: 0 finished; 1 a failure while running (file system, divergence, a damaged checkpoint); 2 bad input
(a config value, a missing or malformed file, a wrong argument); 75 (EX_TEMPFAIL, "try again") interrupted after
saving, so rerunning the same command resumes; 130 aborted by a second Ctrl-C, nothing saved since the last
checkpoint.
"""
from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable, Optional, Sequence

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


def _root_os_error(e: BaseException) -> Optional[OSError]:
  """The OSError behind `e` (libraries wrap them in their own exceptions), or None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno is not None:
      return e
    e = e.__cause__ or e.__context__
  return None


def describe(e: BaseException) -> str:
  """One line for any exception: file-system problems name the path, the rest say what they say."""
  os_error = _root_os_error(e)
  if os_error is not None:
    return os_error_line(os_error)
  text = str(e).strip().splitlines()
  return text[0] if text else type(e).__name__


def exit_code(e: BaseException) -> int:
  """2 for bad input, 1 for a failure while running."""
  if _root_os_error(e) is not None and not isinstance(e, FileNotFoundError):
    return EXIT_FAILURE
  if isinstance(e, (ValueError, FileNotFoundError, KeyError, TypeError)):
    return EXIT_USAGE
  return EXIT_FAILURE


def run_command(main: Callable[[], int], argv: Optional[Sequence[str]] = None) -> int:
  """Runs a command's main; any exception becomes 'error: ...' on stderr and an exit code."""
  try:
    return main()
  except KeyboardInterrupt:
    print("error: aborted (Ctrl-C)", file=sys.stderr)
    return EXIT_ABORTED
  except SystemExit:
    raise
  except BaseException as e:  # noqa: BLE001: every failure of a command ends the same way
    if verbose_requested(argv):
      traceback.print_exc()
    print(f"error: {describe(e)}", file=sys.stderr)
    return exit_code(e)
