"""The loop's callback protocol: what may happen around the training steps.

Its own small module, free of torch, so that anything (the thread governor, the tests'
faults, a user's class named in the ``callbacks`` config node) can implement it without
importing the loop. ``mnistlab.engine.loop.Callback`` is the same class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mnistlab.engine.steps import StepCounter


class Running(Protocol):
    """The loop's sums since the last row (:class:`mnistlab.engine.loop.Running`): train loss,
    correct predictions (device tensors) and the samples they cover."""

    count: int


class Callback:
    """Something that happens around the loop's steps; each method is optional (the base
    does nothing). The BN monitor measures in ``on_step``; the checkpointer saves in
    ``on_step_end`` and ``on_epoch_end``. More come from the ``callbacks`` config node."""

    def on_micro_batch(self, counter: StepCounter) -> None:
        """After a micro-batch's backward, mid-window: nothing can be saved here."""

    def on_step(self, step: int) -> dict[str, Any] | None:
        """After optimizer step ``step``: metrics to add to its row, or None."""
        return None

    def on_step_end(self, counter: StepCounter, running: Running) -> None:
        """After the step's row was logged: a boundary where the run can be saved."""

    def on_evaluation(
        self, counter: StepCounter, running: Running, metrics: dict[str, float]
    ) -> None:
        """After an evaluation row (``metrics``: its values by key, ``val/acc``,
        ``train_slice/loss``, ...) was logged, before ``on_epoch_end``: the best checkpoint
        and early stopping read it."""

    def on_epoch_end(self, counter: StepCounter, running: Running) -> None:
        """After the epoch's evaluation row: the last boundary of the epoch."""

    def on_save(self, step: int) -> None:
        """After the checkpointer wrote a checkpoint at ``step``."""
