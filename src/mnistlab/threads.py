"""How many threads a process may use: oversubscribing a small CPU costs far more than
leaving a core idle (two processes of 2 threads on 2 cores ran 200x slower than one)."""

from __future__ import annotations

import os
import sys
from typing import Any

from hydra.experimental.callback import Callback

from .errors import ConfigError, report


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_threads(value: Any, local_processes: int = 1, parallel_jobs: int = 1) -> int:
    """``trainer.num_threads``: ``auto`` = cores / (local processes x parallel jobs), at
    least 1; else the integer given."""
    if value == "auto" or value is None:
        return max(1, cpu_cores() // max(1, local_processes * parallel_jobs))
    try:
        threads = int(value)
    except (TypeError, ValueError):
        raise ConfigError("trainer.num_threads", value, "'auto' or an integer >= 1") from None
    if threads < 1 or str(threads) != str(value).strip():
        raise ConfigError("trainer.num_threads", value, "'auto' or an integer >= 1")
    return threads


def parallel_jobs(hydra_cfg: Any) -> int:
    """Sweep jobs running at once on this machine: the joblib launcher's ``n_jobs`` (negative
    counts back from the core count, as in joblib), else 1. Threads per job divide by it."""
    from hydra.types import RunMode

    launcher = hydra_cfg.launcher
    n = launcher.get("n_jobs") if "joblib" in str(launcher.get("_target_", "")) else None
    if n is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return 1
    if n < 0:
        n = cpu_cores() + 1 + n
    return max(1, int(n))


class LauncherCheck(Callback):
    """Refuse launcher settings that cannot run, with one line before the launcher starts
    any job (the launcher's own error would be a traceback from inside joblib)."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        launcher = config.hydra.launcher
        if "joblib" in str(launcher.get("_target_", "")) and launcher.get("n_jobs") == 0:
            allowed = "an integer >= 1, or negative to count back from the cores (-1: one per core)"
            # Hydra turns a callback's exception into a warning and goes on: stop here instead.
            sys.exit(report(str(ConfigError("hydra.launcher.n_jobs", 0, allowed))))
