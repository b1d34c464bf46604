"""How many threads a process may use: oversubscribing a small CPU costs far more than
leaving a core idle (two processes of 2 threads on 2 cores ran 200x slower than one: GNU
OpenMP's threads spin while they wait for a partner that another process descheduled).

``trainer.num_threads=auto`` starts at cores / (processes x parallel jobs) and then follows
the machine's load (:class:`ThreadGovernor`): while other processes keep a core of ours busy,
training drops to the cores left (one thread never spins), and takes them back when they are
free again."""

from __future__ import annotations

import math
import os
import time
from typing import Any

from mnistlab.core.errors import ConfigError
from mnistlab.engine.callbacks import Callback as LoopCallback


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


def use_threads(value: Any, local_processes: int = 1, parallel_jobs: int = 1) -> int:
    """Resolve ``trainer.num_threads`` (:func:`resolve_threads`) and give torch that many
    threads: the one call every process that trains or evaluates makes when it starts (a
    single run, a spawned or torchrun rank, a stacked group's jobs, ``eval``). Returns it."""
    import torch

    threads = resolve_threads(value, local_processes, parallel_jobs)
    torch.set_num_threads(threads)
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


def busy_seconds(cores: set[int]) -> float:
    """CPU seconds the machine spent busy on ``cores`` since boot (``/proc/stat``: user, nice,
    system, irq, softirq and steal; idle and iowait are not busy). 0 where there is none."""
    try:
        with open("/proc/stat") as f:
            lines = [ln.split() for ln in f if ln.startswith("cpu") and ln[3:4].isdigit()]
    except OSError:
        return 0.0
    ticks = sum(
        int(v[1]) + int(v[2]) + int(v[3]) + int(v[6]) + int(v[7]) + int(v[8])
        for v in lines
        if int(v[0][3:]) in cores
    )
    return ticks / os.sysconf("SC_CLK_TCK")


NOISE_CORES = 0.75  # others' load on our cores below this does not take a thread away


class ThreadGovernor(LoopCallback):
    """Follows other processes' load on our cores: ``threads`` = the cores they leave free
    (at least 1, at most ``most``), measured over the set-up at the first step, then every
    ``every_s`` seconds of training.

    A loop callback (``on_step``); measuring costs one clock read per step and, four times a
    second, a read of ``/proc/stat`` (tens of microseconds). Changing the thread count
    changes float summation order: runs are bit-identical only at a fixed
    ``trainer.num_threads``."""

    def __init__(self, most: int, every_s: float = 0.25) -> None:
        self.most, self.every_s = most, every_s
        self.cores = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
        self.last = self._sample()
        self.changes = 0

    def _sample(self) -> tuple[float, float, float]:
        own = os.times()
        return time.monotonic(), busy_seconds(self.cores), own.user + own.system

    def threads_for(self, others: float) -> int:
        """Threads to use while other processes use ``others`` cores of ours: one core less
        per core they keep busy (up to three quarters of a core is background noise, such as
        W&B's service process)."""
        return max(1, min(self.most, self.most - math.ceil(others - NOISE_CORES)))

    def on_step(self, step: int) -> None:
        import torch

        # The first step measures the set-up's window: a loaded machine is seen before the
        # first second of spinning threads is paid.
        if step > 1 and time.monotonic() - self.last[0] < self.every_s:
            return None
        now = self._sample()
        wall, busy, own = (b - a for a, b in zip(self.last, now, strict=True))
        self.last = now
        threads = self.threads_for(max(0.0, busy - own) / wall)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            self.changes += 1
        return None
