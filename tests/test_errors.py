"""jaxlm.errors: one line naming the path and the problem, exit codes, Ctrl-C, --verbose tracebacks."""
import errno
import os
import sys
import threading

import pytest

from jaxlm import errors


@pytest.fixture(autouse=True)
def quiet_environment(monkeypatch):
  """No JAXLM_VERBOSE from the caller's shell; the hooks run_command may replace are restored afterwards."""
  monkeypatch.delenv("JAXLM_VERBOSE", raising=False)
  for name in ("excepthook", "unraisablehook"):
    monkeypatch.setattr(sys, name, getattr(sys, name))
  monkeypatch.setattr(threading, "excepthook", threading.excepthook)


def os_error(code, path="/runs/a/checkpoints/12"):
  return OSError(code, os.strerror(code), path)


@pytest.mark.parametrize("code,problem", [
    (errno.ENOSPC, "no space left on the device"),
    (errno.EACCES, "permission denied"),
    (errno.EROFS, "read-only file system"),
    (errno.EDQUOT, "disk quota exceeded"),
])
def test_a_file_system_error_is_its_path_and_problem(code, problem):
  assert errors.describe(os_error(code)) == f"/runs/a/checkpoints/12: {problem}"
  assert errors.exit_code(os_error(code)) == errors.EXIT_FAILURE


def test_a_rename_names_both_paths():
  e = OSError(errno.EACCES, "Permission denied", "/runs/a/.tmp-12", None, "/runs/a/12")
  assert errors.describe(e) == "/runs/a/.tmp-12 -> /runs/a/12: permission denied"


def _raised(make):
  try:
    make()
  except BaseException as e:  # noqa: BLE001
    return e
  raise AssertionError("nothing raised")


def test_a_wrapped_file_system_error_is_found_through_cause_and_context():
  def explicit():
    try:
      raise os_error(errno.ENOSPC)
    except OSError as e:
      raise RuntimeError("the checkpoint could not be saved\nsee the log") from e

  def implicit():
    try:
      raise os_error(errno.EROFS, "/ro/metrics.jsonl")
    except OSError:
      raise ValueError("writing metrics failed")

  assert errors.describe(_raised(explicit)) == "/runs/a/checkpoints/12: no space left on the device"
  assert errors.exit_code(_raised(explicit)) == errors.EXIT_FAILURE
  assert errors.describe(_raised(implicit)) == "/ro/metrics.jsonl: read-only file system"
  assert errors.exit_code(_raised(implicit)) == errors.EXIT_FAILURE  # a file system failure, not bad input


def test_a_wrapped_error_without_a_path_still_says_the_problem():
  def pathless():
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as e:
      raise RuntimeError("saving /runs/a failed") from e
  assert errors.describe(_raised(pathless)).endswith("no space left on the device")


def test_other_errors_are_their_first_line():
  assert errors.describe(ValueError("train.steps=-5: must be an integer >= 1\ndetails")) == \
      "train.steps=-5: must be an integer >= 1"
  assert errors.describe(RuntimeError()) == "RuntimeError"


@pytest.mark.parametrize("error,code", [
    (ValueError("bad value"), errors.EXIT_USAGE),
    (TypeError("bad type"), errors.EXIT_USAGE),
    (KeyError("field"), errors.EXIT_USAGE),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/config.json"), errors.EXIT_USAGE),
    (FileNotFoundError("/x is not a model directory"), errors.EXIT_USAGE),
    (PermissionError(errno.EACCES, "Permission denied", "/x"), errors.EXIT_FAILURE),
    (FloatingPointError("loss is nan at step 3"), errors.EXIT_FAILURE),
    (RuntimeError("device lost"), errors.EXIT_FAILURE),
])
def test_exit_codes(error, code):
  assert errors.exit_code(error) == code


# ------------------------------------------------------------------------------------------ run_command
def fail_with(error):
  def main():
    raise error
  return main


def test_run_command_returns_the_commands_code():
  assert errors.run_command(lambda: 0, []) == 0
  assert errors.run_command(lambda: errors.EXIT_INTERRUPTED, []) == 75


def test_run_command_prints_one_line_and_the_exit_code(capsys):
  assert errors.run_command(fail_with(os_error(errno.ENOSPC, "/runs/b")), []) == errors.EXIT_FAILURE
  assert capsys.readouterr().err == "error: /runs/b: no space left on the device\n"
  assert errors.run_command(fail_with(ValueError("opt.lr=-1: must be a number >= 0")), []) == errors.EXIT_USAGE
  assert capsys.readouterr().err == "error: opt.lr=-1: must be a number >= 0\n"


def test_ctrl_c_is_exit_130_without_a_traceback(capsys):
  assert errors.run_command(fail_with(KeyboardInterrupt()), []) == errors.EXIT_ABORTED == 130
  err = capsys.readouterr().err
  assert err == "error: aborted (Ctrl-C)\n"


def test_verbose_adds_the_traceback(capsys, monkeypatch):
  error = ValueError("model.d_model=0: must be an integer >= 1")
  assert errors.run_command(fail_with(error), ["--checkpoint", "x", "--verbose"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("Traceback (most recent call last):") and "raise error" in err
  assert err.endswith("error: model.d_model=0: must be an integer >= 1\n")
  monkeypatch.setenv("JAXLM_VERBOSE", "1")
  assert errors.run_command(fail_with(error), []) == 2
  assert "Traceback" in capsys.readouterr().err
  monkeypatch.setenv("JAXLM_VERBOSE", "0")
  assert errors.run_command(fail_with(error), []) == 2
  assert "Traceback" not in capsys.readouterr().err


def test_system_exit_passes_through():
  with pytest.raises(SystemExit):
    errors.run_command(fail_with(SystemExit(2)), [])
