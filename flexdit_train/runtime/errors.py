"""One error policy for every command-line app: a user's mistake is one line and exit code 2; a bug keeps its
traceback.

User errors are the ones this project raises for bad input, with a message that names the cause and the fix:
``ValueError`` (and its subclasses :class:`UserError`, ``CheckpointError``), missing files, a mandatory config
value left unset, and Hydra's wrapper around any of these; a full disk is the user's to fix too. The app prints ``error: <message>`` on stderr and
exits with status 2; the full traceback goes to the run's log file, and to the console when
``HYDRA_FULL_ERROR=1`` or ``FLEXDIT_VERBOSE=1`` is set (or ``--verbose`` for the argparse apps). Every other
exception is unexpected and propagates with its traceback.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import InstantiationException
from omegaconf.errors import MissingMandatoryValue

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A problem with what the user gave (config, path, checkpoint, budget, data); the message says how to fix it."""


def check_range(name: str, value: Any, low: float | None = None, high: float | None = None,
                integer: bool = False) -> Any:
    """``value`` of config key ``name`` if it is a number in [low, high] (an int when ``integer``), else a UserError
    naming the key, the value and the range."""
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else (
        isinstance(value, int | float) and not isinstance(value, bool))
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        bounds = " and ".join(part for part in (f">= {low}" if low is not None else "",
                                                f"<= {high}" if high is not None else "") if part)
        raise UserError(f"{name}={value!r} must be {kind}{' ' + bounds if bounds else ''}; set {name}=...")
    return value


def verbose() -> bool:
    """Whether the user asked for tracebacks of their own errors too."""
    return any(os.environ.get(name, "") not in ("", "0") for name in ("HYDRA_FULL_ERROR", "FLEXDIT_VERBOSE"))


def user_message(err: BaseException) -> str | None:
    """The one-line message of a user error, or None for an unexpected one."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__  # Hydra's wrapper adds "Error in call to target ..." around our own message
    if isinstance(err, MissingMandatoryValue):
        key = getattr(err, "full_key", None) or "a required value"
        return f"{key} is required and has no default: pass {key}=..."
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        where = f" while writing {err.filename}" if err.filename else ""
        return (f"no space left on device{where}; the files written before are intact: free space and rerun the "
                "same command to resume")
    if isinstance(err, FileNotFoundError):
        name = err.filename or str(err)
        return f"{name}: no such file or directory; check the path" if err.filename else str(err)
    if isinstance(err, ValueError):
        return " ".join(str(err).split()) or type(err).__name__
    return None


def _log_to_files(err: BaseException) -> list[str]:
    """Write the traceback to the file handlers of the root logger only (the run's log under Hydra)."""
    paths = []
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (err,), (type(err), err, err.__traceback__))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler.baseFilename != os.devnull:
            handler.handle(record)
            paths.append(handler.baseFilename)
    return paths


def exit_on_user_error(err: BaseException, show_traceback: str = "HYDRA_FULL_ERROR=1") -> None:
    """Print a user error as one line and exit 2 (its traceback only in the log); return for anything else.
    ``show_traceback`` names what makes the traceback appear, for apps without a log file."""
    message = user_message(err)
    if message is None or verbose():
        return
    files = _log_to_files(err)
    hint = f" (traceback: {files[0]})" if files else f" ({show_traceback} shows the traceback)"
    print(f"error: {message}{hint}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def report_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a Hydra task function (under ``@hydra.main``) with the error policy."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except Exception as err:
            exit_on_user_error(err)
            raise

    return wrapper
