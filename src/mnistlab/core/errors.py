"""How a job can end other than by completing, in one module every layer may import.

* :class:`UserError` — something the user can fix (a config value, a data file, the
  environment). It is shown as one ``error:`` line and ends the command with exit code 2;
  :class:`ConfigError` is the common case, naming the key, the value and what is allowed.
* :class:`Diverged` — the loss or the weights became NaN or infinite.
* :class:`Interrupted` — SIGTERM or SIGINT arrived and a checkpoint was written.
* :class:`StoppedEarly` — early stopping ended the run at an evaluation: a *completed* run.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

USER_ERROR_EXIT = 2  # the exit code of every command after a UserError


class UserError(Exception):
    """A mistake the user can fix; its message is one line that says how."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work: one line with the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")


class Diverged(RuntimeError):
    """The loss (or a weight) became NaN or infinite at optimizer step ``step``."""

    def __init__(self, step: int, loss: float) -> None:
        self.step, self.loss = step, loss
        super().__init__(f"loss became {loss} at optimizer step {step}")


class Interrupted(RuntimeError):
    """SIGTERM or SIGINT arrived; a checkpoint was written at ``step``."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step
        super().__init__(f"interrupted by {signal.Signals(signum).name} at optimizer step {step}")


class StoppedEarly(Exception):
    """The objective stopped improving (``trainer.early_stopping``): raised at the epoch end
    whose evaluation decided it, after the checkpoint; the loop ends there and the run is
    completed, not failed."""

    def __init__(self, step: int, epoch: int, reason: str) -> None:
        self.step, self.epoch, self.reason = step, epoch, reason
        super().__init__(f"stopped early at optimizer step {step} (epoch {epoch}): {reason}")


# What the environment can refuse a file operation for, and what the user can do about it.
ENVIRONMENT_FIXES = {
    errno.ENOSPC: "free some space, or write elsewhere (hydra.run.dir / hydra.sweep.dir)",
    errno.EDQUOT: "free some space, or write elsewhere (hydra.run.dir / hydra.sweep.dir)",
    errno.EFBIG: "the file size limit (ulimit -f) is too small for it",
    errno.EACCES: "check its permissions, or use another folder",
    errno.EPERM: "check its permissions, or use another folder",
    errno.EROFS: "the file system is read-only: use another folder",
    errno.ENAMETOOLONG: "use a shorter path (hydra.run.dir / hydra.sweep.dir)",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}


def environment_message(exc: BaseException) -> str | None:
    """One line for a file operation the environment refused (disk full, no permission, a
    name too long), naming the file and the fix; None for any other error."""
    if not isinstance(exc, OSError) or exc.errno not in ENVIRONMENT_FIXES:
        return None
    where = exc.filename if exc.filename is not None else "a file"
    return f"{where}: {exc.strerror}; {ENVIRONMENT_FIXES[exc.errno]}"


def user_message(exc: BaseException) -> str | None:
    """The one line a user reads for ``exc``: a :class:`UserError`, or a file operation the
    environment refused. None for anything else: a bug keeps its traceback. (Hydra's compose
    errors are the config's to word: :func:`mnistlab.config.compose_message`.)"""
    if isinstance(exc, UserError):
        return str(exc)
    return environment_message(exc)


def report(message: str) -> int:
    """Print a user's error as its one ``error:`` line; return the exit code that goes with it."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT


def quiet_on_closed_pipe(main: Callable[..., int]) -> Callable[..., int]:
    """A command's ``main`` that ends quietly when its reader goes away (``compare ... | head``):
    the rest of its output goes nowhere, and no BrokenPipeError traceback is printed."""

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> int:
        try:
            code = main(*args, **kwargs)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0

    return wrapped
