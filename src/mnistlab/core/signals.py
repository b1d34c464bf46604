"""SIGTERM and SIGINT, the signals that ask a run to stop, in one place.

Three kinds of process install a handler for them: a training process (its checkpointers set
a flag; the next step boundary saves and stops), a process that started ranks (it passes the
signal on) and the process that runs a sweep (it stops the sweep's jobs and writes the sweep's
summary). Every handler is installed through :func:`handling` or :func:`install_for_sweep`, so
the previous one always comes back. SLURM and systemd stop jobs with SIGTERM; Ctrl-C is SIGINT.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
Handler = Callable[[int, Any], None]


@contextlib.contextmanager
def handling(handler: Handler) -> Iterator[None]:
    """``handler`` for SIGTERM and SIGINT inside the block, the previous handlers after it.
    Outside the main thread (signals cannot be set there) the signals are left alone."""
    previous: dict[int, Any] = {}
    try:
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, handler)
    except ValueError:
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class SweepStop:
    """The base of the handler a sweep's process installs (:func:`install_for_sweep`), so a
    job running in that same process can stop its sweep too (:func:`stop_sweep`)."""

    def __call__(self, signum: int, frame: Any) -> None:
        raise NotImplementedError


def install_for_sweep(handler: SweepStop | None) -> None:
    """``handler`` for the whole sweep (its start); None puts Python's defaults back (its end)."""
    for sig in STOP_SIGNALS:
        if handler is not None:
            signal.signal(sig, handler)
        else:
            default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, default)


def stop_sweep(signum: int, *, multirun: bool) -> None:
    """A job that was interrupted: stop its sweep too. Where this process runs the sweep
    (Hydra's basic launcher, the stacked launcher) its handler stops every job and exits. A
    launcher's worker process (joblib, submitit) ends here, at once: left alive, the launcher
    would keep it for its next job and the sweep's process would wait its grace period out."""
    handler = signal.getsignal(signal.SIGTERM)
    if isinstance(handler, SweepStop):
        handler(signum, None)
    if multirun:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)


def send(pids: list[int], signum: int) -> None:
    """``signum`` to each of ``pids`` that still runs (one may have ended meanwhile)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
