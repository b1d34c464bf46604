"""Faults the tests inject into real runs, through the app's one seam for extra callbacks.

A run takes them like any loop callback (``mnistlab.engine.loop.Callback``), from the config:

    python -m mnistlab.train +callbacks.kill._target_=faults.KillAtMicroBatch +callbacks.kill.at=8

``conftest`` puts this folder on ``PYTHONPATH``, so the app's processes (spawned ranks too)
can import this module. :func:`override` writes those arguments.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from mnistlab.engine.loop import Callback
from mnistlab.engine.steps import StepCounter


def override(name: str, cls: type, **params: Any) -> list[str]:
    """The command-line overrides that add ``cls(**params)`` as callback ``name``."""
    args = [f"+callbacks.{name}._target_={__name__}.{cls.__name__}"]
    return args + [f"+callbacks.{name}.{k}={v}" for k, v in params.items()]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtMicroBatch(Callback):
    """SIGKILL the process right after micro-batch ``at`` (counted from the run's start):
    a kill mid-window, with gradients half accumulated."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_micro_batch(self, counter: StepCounter) -> None:
        if counter.micro_batches == self.at:
            _die()


class KillAfterSave(Callback):
    """SIGKILL the process right after the ``nth`` checkpoint it writes (the step-0 one
    counts)."""

    def __init__(self, nth: int) -> None:
        self.nth, self.saved = nth, 0

    def on_save(self, step: int) -> None:
        self.saved += 1
        if self.saved == self.nth:
            _die()


class RaiseAtStep(Callback):
    """Rank ``rank`` raises after its optimizer step ``step``: a worker that fails."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_step(self, step: int) -> dict[str, Any] | None:
        import torch.distributed as dist

        me = dist.get_rank() if dist.is_initialized() else 0
        if me == self.rank and step == self.step:
            raise RuntimeError(f"injected fault at optimizer step {step} (rank {me})")
        return None


class KillInJob(Callback):
    """SIGKILL the process at micro-batch ``at`` of sweep job ``kill`` only; ``job`` is the
    running job's number (``${hydra:job.num}``). Jobs of Hydra's basic launcher run inside the
    sweep's process, so this kills the whole sweep mid-trial."""

    def __init__(self, job: int, kill: int, at: int = 1) -> None:
        self.armed, self.at = job == kill, at

    def on_micro_batch(self, counter: StepCounter) -> None:
        if self.armed and counter.micro_batches == self.at:
            _die()


class RaiseInJob(Callback):
    """Sweep job ``fail`` raises after its first optimizer step (``job`` as in
    :class:`KillInJob`): one trial of a search that fails."""

    def __init__(self, job: int, fail: int) -> None:
        self.job, self.armed = job, job == fail

    def on_step(self, step: int) -> dict[str, Any] | None:
        if self.armed:
            raise RuntimeError(f"injected fault in sweep job {self.job}")
        return None


class KillRankAt(Callback):
    """Rank ``rank`` dies (SIGKILL) right after its micro-batch ``at``: a worker that
    vanishes without a word."""

    def __init__(self, rank: int, at: int) -> None:
        self.rank, self.at = rank, at

    def on_micro_batch(self, counter: StepCounter) -> None:
        import torch.distributed as dist

        me = dist.get_rank() if dist.is_initialized() else 0
        if me == self.rank and counter.micro_batches == self.at:
            _die()


class SignalInJob(Callback):
    """Send ``sig`` (a number; SIGTERM by default) to this process once, at micro-batch ``at``
    of sweep job ``stop`` (``job`` as in :class:`KillInJob`): a stop that the run handles."""

    def __init__(self, job: int, stop: int, at: int = 1, sig: int = int(signal.SIGTERM)) -> None:
        self.armed, self.at, self.sig = job == stop, at, sig

    def on_micro_batch(self, counter: StepCounter) -> None:
        if self.armed and counter.micro_batches == self.at:
            self.armed = False
            os.kill(os.getpid(), self.sig)
