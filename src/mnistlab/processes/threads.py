"""How many threads a process trains with, decided once per run from the machine and the
config, never from the load: a different thread count changes float32 sums (a train-mode
``batch_norm`` or a 784-wide product differs in the 7th digit between 1 and 2 threads), so a
count that followed the load would make the same command give different numbers.

``trainer.num_threads=auto`` (the default) is decided from the machine and the model: one
thread where a training micro-batch is too small to split (:data:`PARALLEL_FLOPS`: the default
MLP, and an MLP on MNIST at batch 64, train as fast on one thread as on two, and a second
process on the same cores cannot slow one thread down), else the cores this process may run
on, divided by the ranks this machine runs (``trainer.devices``). The same for a single run,
a joblib job, a stacked group and a resumed run. Where several threads do run, GNU OpenMP's
threads sleep while they wait (``mnistlab/__init__.py`` sets ``OMP_WAIT_POLICY=PASSIVE`` before
torch loads): spinning threads made two runs of 2 threads on 2 cores 200x slower than one. What a
sleeping wait costs alone, and keeps beside a rival run, is in the bench's ``threads_*`` rows.

``trainer.num_threads=adaptive`` waives reproducibility for speed on a shared machine: it
starts as ``auto`` and then follows the load (:class:`ThreadGovernor`); the summary's
``threads.schedule`` records every change."""

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


POLICIES = ("auto", "adaptive")  # trainer.num_threads's words; any other value is a count
ALLOWED = "'auto', 'adaptive' or an integer >= 1"


def resolve_threads(value: Any, local_processes: int = 1) -> int:
    """``trainer.num_threads``: ``auto`` and ``adaptive`` start at cores / local processes
    (at least 1); else the integer given. Nothing else (the load, the launcher, the parallel
    jobs of a sweep) moves it: the same command trains with the same count."""
    if value in POLICIES or value is None:
        return max(1, cpu_cores() // max(1, local_processes))
    try:
        threads = int(value)
    except (TypeError, ValueError):
        raise ConfigError("trainer.num_threads", value, ALLOWED) from None
    if threads < 1 or str(threads) != str(value).strip():
        raise ConfigError("trainer.num_threads", value, ALLOWED)
    return threads


# A training micro-batch's FLOPs (forward and backward) from which a second thread pays: on a
# 2-core CPU an MNIST MLP at batch 64 (29 MFLOP) ran 1.05x faster on two threads, a CNN at
# batch 64 (453 MFLOP) 1.7x.
PARALLEL_FLOPS = 100e6


def threads_for_model(threads: int, flops_per_batch: float) -> int:
    """``auto``'s second half, once the model is built: ``threads``, or one thread if a
    training micro-batch of ``flops_per_batch`` is under :data:`PARALLEL_FLOPS`."""
    return 1 if flops_per_batch < PARALLEL_FLOPS else threads


def use_threads(value: Any, local_processes: int = 1) -> int:
    """Resolve ``trainer.num_threads`` (:func:`resolve_threads`) and give torch that many
    threads: the one call every process that trains or evaluates makes when it starts (a
    single run, a spawned or torchrun rank, a stacked group's jobs, ``eval``). Returns it."""
    import torch

    threads = resolve_threads(value, local_processes)
    torch.set_num_threads(threads)
    return threads


def parallel_jobs(hydra_cfg: Any) -> int:
    """Sweep jobs running at once on this machine: the joblib launcher's ``n_jobs`` (negative
    counts back from the core count, as in joblib), else 1 (an Optuna search's default)."""
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
    """``trainer.num_threads=adaptive``: follows other processes' load on our cores:
    ``threads`` = the cores they leave free (at least 1, at most ``most``), measured over the
    set-up at the first step, then every ``every_s`` seconds of training.

    A loop callback (``on_step``); measuring costs one clock read per step and, four times a
    second, a read of ``/proc/stat`` (tens of microseconds). Changing the thread count
    changes float summation order, so ``schedule`` keeps each change as ``[step, threads]``
    (the first entry: the count training started with) for the summary."""

    def __init__(self, most: int, every_s: float = 0.25, start_step: int = 0) -> None:
        self.most, self.every_s = most, every_s
        self.cores = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
        self.last = self._sample()
        self.schedule: list[list[int]] = [[start_step, most]]

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
            self.schedule.append([step, threads])
        return None
