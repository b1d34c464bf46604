"""How a job can end other than by completing, in one module every layer may import.

* :class:`UserError` — something the user can fix (a config value, a data file, the
  environment). It is shown as one ``error:`` line and ends the command with exit code 2;
  :class:`ConfigError` is the common case, naming the key, the value and what is allowed.
* :class:`Diverged` — the loss or the weights became NaN or infinite.
* :class:`Interrupted` — SIGTERM or SIGINT arrived and a checkpoint was written.
"""

from __future__ import annotations

import signal
import sys
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


def user_message(exc: BaseException) -> str | None:
    """The one line a user reads for ``exc``: a :class:`UserError`, or a Hydra or OmegaConf
    error met while composing the config. None for anything else: a bug keeps its traceback."""
    if isinstance(exc, UserError):
        return str(exc)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        from .config import hydra_error_line

        return hydra_error_line(exc)
    return None


def report(message: str) -> int:
    """Print a user's error as its one ``error:`` line; return the exit code that goes with it."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT
