"""The run's objective at every evaluation: ``checkpoints/best.pt`` when it improves, early
stopping when it stalls.

One callback for both (Lightning's ``ModelCheckpoint(monitor=...)`` and ``EarlyStopping``)
because they read the same value at the same moment and their state must be saved together:
it rides in the checkpoint's ``extra["best"]``, so a resumed run goes on counting where it
stood, and a run that stopped early resumes as stopped. ``best.pt`` is written by the
checkpointer itself (:meth:`~mnistlab.engine.checkpoint.Checkpointer.save_as`): the format,
digest and contents of ``last.pt`` at that evaluation.

Any improvement, however small, makes a new ``best.pt``; only one by more than ``min_delta``
resets the patience (as Lightning's two callbacks do).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from mnistlab.core.errors import StoppedEarly
from mnistlab.core.files import atomic_write_bytes
from mnistlab.engine.checkpoint import BEST, Checkpointer
from mnistlab.engine.loop import Callback, Running
from mnistlab.engine.steps import StepCounter


@dataclass
class Record:
    """What the checkpoint keeps of the objective's history."""

    value: float | None = None  # the best value so far, and where
    step: int | None = None
    epoch: int | None = None
    reference: float | None = None  # what early stopping's next improvement must beat
    waited: int = 0  # evaluations in a row without such an improvement
    stopped: dict[str, Any] | None = None  # {step, epoch, reason} once early stopping ended it


def better(value: float, than: float | None, maximize: bool, by: float = 0.0) -> bool:
    """Whether ``value`` beats ``than`` by more than ``by`` (anything beats nothing; NaN
    never beats)."""
    if math.isnan(value):
        return False
    if than is None:
        return True
    return value - by > than if maximize else value + by < than


class Best(Callback):
    """Reads the objective ``metric`` (row key ``key``; None: no evaluation measures it, so
    best.pt is the last checkpoint, see :meth:`finish`) at each evaluation. ``patience``
    (None: off) evaluations in a row without an improvement by more than ``min_delta`` end
    the run at that epoch's end, once its ``last.pt`` is written. ``saved``: the state a
    resumed checkpoint kept; ``agree``: every rank's stop decision as one (a collective)."""

    def __init__(
        self,
        ckpt: Checkpointer,
        metric: str,
        key: str | None,
        maximize: bool,
        patience: int | None = None,
        min_delta: float = 0.0,
        saved: Mapping[str, Any] | None = None,
        agree: Callable[[int], int] = int,
    ) -> None:
        self.ckpt, self.metric, self.key, self.maximize = ckpt, metric, key, maximize
        self.patience, self.min_delta, self.agree = patience, min_delta, agree
        self.path = ckpt.path.parent.parent / BEST
        same = saved and (saved.get("metric"), saved.get("maximize")) == (metric, maximize)
        fields = {k: v for k, v in (saved or {}).items() if k in Record.__dataclass_fields__}
        self.state = Record(**fields) if same else Record()  # another objective: afresh
        self.stopping = False
        self._publish()

    def on_evaluation(
        self, counter: StepCounter, running: Running, metrics: dict[str, float]
    ) -> None:
        if self.key is None:
            return
        value, s = float(metrics[self.key]), self.state
        improved = better(value, s.value, self.maximize)
        if improved:
            s.value, s.step, s.epoch = value, counter.optimizer_steps, counter.epochs
        if self.patience is not None:
            self._patience(value, counter)
        self._publish()  # before best.pt: it holds this state, as last.pt will
        if improved:
            self.ckpt.save_as(self.path, counter, running.as_dict())

    def _patience(self, value: float, counter: StepCounter) -> None:
        """Count this evaluation; decide (every rank alike) whether the run stops here."""
        s = self.state
        if better(value, s.reference, self.maximize, self.min_delta):
            s.reference, s.waited = value, 0
        else:
            s.waited += 1
        assert self.patience is not None
        if self.agree(int(s.waited >= self.patience)):
            best = "none" if s.value is None else f"{s.value:.6g}"
            reason = (
                f"{self.metric} did not improve by more than {self.min_delta:g} in "
                f"{s.waited} evaluation(s); best {best} at step {s.step}"
            )
            s.stopped = {"step": counter.optimizer_steps, "epoch": counter.epochs,
                         "reason": reason}  # fmt: skip
            self.stopping = True

    def on_epoch_end(self, counter: StepCounter, running: Running) -> None:
        """After the checkpointer saved ``last.pt`` (this callback comes after it): stop."""
        if self.stopping and self.state.stopped is not None:
            self.stopping = False
            stop = self.state.stopped
            raise StoppedEarly(stop["step"], stop["epoch"], stop["reason"])

    def finish(self, counter: StepCounter, final: Mapping[str, Any]) -> None:
        """The run completed: an objective no evaluation measures (``key`` None) is known
        now, from the ``final`` metrics; its best.pt is ``last.pt`` (the last epoch end's)."""
        if self.key is not None or self.metric not in final:
            return
        s = self.state
        s.value, s.step = float(final[self.metric]), counter.optimizer_steps
        s.epoch = counter.epochs
        if self.ckpt.write:
            atomic_write_bytes(self.path, self.ckpt.path.read_bytes())

    def record(self) -> dict[str, Any] | None:
        """The summary's ``best``: the metric, its best value, where, and the file."""
        s = self.state
        if s.value is None:
            return None
        return {"metric": self.metric, "value": s.value, "step": s.step, "epoch": s.epoch,
                "path": str(self.path)}  # fmt: skip

    def _publish(self) -> None:
        """The state into the checkpointer's ``extra``: saved with every checkpoint."""
        self.ckpt.extra["best"] = {"metric": self.metric, "maximize": self.maximize,
                                   **asdict(self.state)}  # fmt: skip
