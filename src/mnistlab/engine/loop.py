"""The training loop: epochs, micro-batches, accumulation windows, optimizer steps.

Read it top to bottom: an *epoch* walks this rank's shard once; an *iteration* is one
micro-batch forward and backward; a *step* is one optimizer update after ``grad_accum``
micro-batches (the epoch's last window may be shorter and still steps), and one step of the
learning-rate schedule, if the run has one. The window's loss is
the sum over its samples divided by the number of samples it really holds, so every update
is the gradient of a true average. Losses and counts accumulate on the device and are read
only when a row is logged, so the GPU path has no per-step host sync.

The loop knows nothing of processes, signals or files: what happens around a step
(measurements, checkpoints) is a :class:`~mnistlab.engine.callbacks.Callback`, and rows go to a
``sinks`` object.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from mnistlab.core.errors import Diverged, StoppedEarly
from mnistlab.engine.callbacks import Callback
from mnistlab.engine.data import Split
from mnistlab.engine.models import autocast
from mnistlab.engine.regularizers import Regularizer
from mnistlab.engine.steps import Cadence, StepCounter, StepPlan


class RowSink(Protocol):
    def log(self, row: dict[str, Any], kind: str = "step") -> None: ...


@dataclass
class Running:
    """Train loss, correct predictions and samples since the last row (on the device)."""

    loss: Tensor
    correct: Tensor
    count: int = 0

    @classmethod
    def zeros(cls, device: torch.device, saved: dict[str, Any] | None = None) -> Running:
        run = cls(
            torch.zeros((), dtype=torch.float64, device=device),
            torch.zeros((), dtype=torch.int64, device=device),
        )
        if saved:  # resuming: the sums since the last row before the checkpoint
            run.loss.fill_(saved["loss"]), run.correct.fill_(saved["correct"])
            run.count = int(saved["count"])
        return run

    def as_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "correct": self.correct, "count": self.count}


@dataclass
class LoopConfig:
    seed: int
    cadence: Cadence
    rank: int = 0
    eval_every_n_epochs: int = 1
    eval_batch_size: int = 1024
    precision: str = "fp32"
    grad_clip_norm: float | None = None  # the window's gradient: global L2 norm at most this
    grad_clip_value: float | None = None  # each element within [-value, value]


@dataclass
class Fit:
    """What the loop did: the counter (the one passed in, ticked in place) and timings
    (``start_at`` and ``end_at``: the loop's own ``perf_counter`` span)."""

    counter: StepCounter
    timings: dict[str, float] = field(default_factory=lambda: {"eval_s": 0.0})


def epoch_order(plan: StepPlan, seed: int, epoch: int, rank: int) -> Tensor:
    """This rank's sample indices for one epoch, exactly as DistributedSampler yields them.

    The sampler's own steps (seeded ``randperm``, pad by repeating the head or cut the tail,
    take every ``world_size``-th from ``rank``) on a tensor: the sampler walks 60,000 Python
    ints per MNIST epoch. ``tests/test_steps.py`` checks equality with the real sampler."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(plan.num_samples, generator=g)
    total = plan.samples_per_rank * plan.world_size
    if total > plan.num_samples:  # pad with the head, repeated as often as needed
        order = order.repeat(math.ceil(total / plan.num_samples))
    return order[rank : total : plan.world_size]


def micro_batches(order: Tensor, plan: StepPlan) -> list[Tensor]:
    batches = list(order.split(plan.batch_size))
    if plan.drop_last and batches and len(batches[-1]) < plan.batch_size:
        batches.pop()
    return batches


def windows(batches: list[Tensor], grad_accum: int) -> Iterator[list[Tensor]]:
    """Accumulation windows of ``grad_accum`` micro-batches; the last may be shorter."""
    for start in range(0, len(batches), grad_accum):
        yield batches[start : start + grad_accum]


@torch.inference_mode()
def evaluate(
    model: nn.Module, split: Split, batch_size: int, precision: str = "fp32"
) -> dict[str, float]:
    """Loss and accuracy in eval mode (BN uses its running statistics, dropout is off)."""
    was_training = model.training
    model.eval()
    device = split.x.device
    loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(split), batch_size):
        x, y = split.x[start : start + batch_size], split.y[start : start + batch_size]
        with autocast(device, precision):
            out = model(x)
        loss += F.cross_entropy(out.float(), y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
    model.train(was_training)
    n = max(1, len(split))
    return {"loss": float(loss) / n, "acc": float(correct) / n}


@dataclass
class Loop:
    """One run's training: the model, what updates it, the data, and where rows go."""

    model: nn.Module  # what is trained through: DDP and/or torch.compile wrappers welcome
    optimizer: torch.optim.Optimizer
    regularizer: Regularizer
    plan: StepPlan
    train: Split
    test: Split
    sinks: RowSink
    cfg: LoopConfig
    callbacks: Sequence[Callback] = ()
    val: Split | None = None  # evaluated beside test at every evaluation; None: no split
    scheduler: LRScheduler | None = None  # stepped once per optimizer step; None: constant

    def fit(self, counter: StepCounter | None = None, running: dict[str, Any] | None = None) -> Fit:
        """Train for ``plan.epochs`` epochs; return what was really counted, and timings.

        To resume, pass the checkpoint's ``counter`` (taken at a window end) and ``running``
        sums: the windows already done in the current epoch are skipped."""
        result = Fit(counter or StepCounter())
        result.timings["start_at"] = time.perf_counter()
        counter, plan, model, train = result.counter, self.plan, self.model, self.train
        device = train.x.device
        no_sync = getattr(model, "no_sync", contextlib.nullcontext)  # DDP: no all-reduce
        run = Running.zeros(device, running)
        model.train()

        for epoch in range(counter.epochs, plan.epochs):
            order = epoch_order(plan, self.cfg.seed, epoch, self.cfg.rank).to(device)
            done = counter.micro_batches - epoch * plan.micro_batches_per_epoch  # resuming
            for window in windows(micro_batches(order, plan)[done:], plan.grad_accum):
                window_samples = sum(len(idx) for idx in window)
                for i, idx in enumerate(window):
                    last = i == len(window) - 1
                    x, y = train.x.index_select(0, idx), train.y.index_select(0, idx)  # gather
                    with no_sync() if not last else contextlib.nullcontext():
                        with autocast(device, self.cfg.precision):
                            out = model(x)
                        loss_sum = F.cross_entropy(out.float(), y, reduction="sum")
                        loss = loss_sum / window_samples
                        if last and self.regularizer.adds_to_loss:
                            loss = loss + self.regularizer.penalty()
                        loss.backward()
                    run.loss.add_(loss_sum.detach())  # in place, widened to float64: one op
                    run.correct.add_((out.detach().argmax(1) == y).sum())
                    self.count_micro_batch(counter, run, len(idx))

                lr = self.optimizer.param_groups[0]["lr"]  # this step's rate, for its row
                self.clip_gradients()
                self.optimizer.step()
                self.regularizer.after_step(lr)  # proximal L1 / decoupled decay: same rate
                self.optimizer.zero_grad(set_to_none=True)
                self.close_step(counter, run, result, lr)

            try:
                self.close_epoch(counter, run, result)
            except StoppedEarly:  # a completed run, shorter: the callback that said so knows why
                break
        result.timings["end_at"] = time.perf_counter()
        return result

    def clip_gradients(self) -> None:
        """Clip the window's whole gradient once, just before its optimizer step (after the
        last micro-batch's backward: under DDP already averaged over the ranks, so every rank
        clips alike). Elements first, then the norm: both bounds then hold."""
        norm, value = self.cfg.grad_clip_norm, self.cfg.grad_clip_value
        if norm is None and value is None:
            return
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if value is not None:
            nn.utils.clip_grad_value_(params, value)
        if norm is not None:
            nn.utils.clip_grad_norm_(params, norm)

    def count_micro_batch(self, counter: StepCounter, run: Running, samples: int) -> None:
        """A micro-batch of ``samples`` (this rank's) went forward and backward."""
        counter.micro_batches += 1
        counter.samples_seen += samples * self.plan.world_size
        run.count += samples
        for c in self.callbacks:
            c.on_micro_batch(counter)

    def close_step(self, counter: StepCounter, run: Running, result: Fit, lr: float) -> None:
        """After the optimizer step taken at rate ``lr``: the schedule's next rate, the count,
        the step's row and callbacks."""
        if self.scheduler is not None:  # the next step's rate
            self.scheduler.step()
        counter.optimizer_steps += 1
        self._after_step(counter, run, result, lr)

    def close_epoch(
        self,
        counter: StepCounter,
        run: Running,
        result: Fit,
        measured: dict[str, dict[str, float]] | None = None,
    ) -> None:
        """The epoch's end: its evaluation row (``measured``: the splits' metrics if already
        evaluated, by a stacked group), then the callbacks."""
        counter.epochs += 1
        self._end_epoch(counter, run, result, measured)
        for c in self.callbacks:
            c.on_epoch_end(counter, run)

    def evaluates(self, epochs: int) -> bool:
        """Whether the end of epoch ``epochs`` (counted from 1) evaluates: on the epoch
        cadence and always after the last epoch."""
        return epochs % self.cfg.eval_every_n_epochs == 0 or epochs == self.plan.epochs

    def eval_splits(self) -> dict[str, Split]:
        """What an evaluation row measures, by its prefix: the validation part (what a sweep
        selects on), the test set (reported) and a test-sized slice of training
        (``train_slice/*``: the train-test gap in eval mode, cheaply; the whole training
        split in eval mode is the summary's ``train_eval/*``, measured once at the end)."""
        splits = {"val": self.val} if self.val is not None else {}
        part = Split(self.train.x[: len(self.test)], self.train.y[: len(self.test)])
        return splits | {"test": self.test, "train_slice": part}

    def _after_step(self, counter: StepCounter, run: Running, result: Fit, lr: float) -> None:
        """The finite-loss check, this step's row (on the cadence, with the rate ``lr`` the
        step used), the boundary callbacks."""
        step, cadence = counter.optimizer_steps, self.cfg.cadence
        if step == 1:
            result.timings.update(first_step_at=time.perf_counter(), first_step_unix=time.time())
        # On CPU a read costs nothing: check every step; on a GPU it is a host sync: at rows.
        check_every = 1 if run.loss.device.type == "cpu" else cadence.row_every
        if step % check_every == 0 and not math.isfinite(run.loss.item()):
            raise Diverged(step, float(run.loss))
        on_row = cadence.row(step)
        row: dict[str, Any] = self.regularizer.metrics() if on_row else {}  # norms, sparsity
        for c in self.callbacks:
            row.update(c.on_step(step) or {})
        if on_row:
            row["train/loss"] = float(run.loss) / max(1, run.count)
            row["train/acc"] = float(run.correct) / max(1, run.count)
            row["lr"] = lr
            if not torch.isfinite(run.loss):
                raise Diverged(step, float(run.loss))
            run.loss.zero_(), run.correct.zero_()
            run.count = 0
        if row:
            self.sinks.log(position(counter, self.plan) | row)
        for c in self.callbacks:
            c.on_step_end(counter, run)

    def _end_epoch(
        self,
        counter: StepCounter,
        run: Running,
        result: Fit,
        measured: dict[str, dict[str, float]] | None,
    ) -> None:
        """The evaluation row, if this epoch end evaluates, then the callbacks that read it."""
        if not self.evaluates(counter.epochs):
            return
        t0 = time.perf_counter()
        if measured is None:
            args = (self.cfg.eval_batch_size, self.cfg.precision)
            measured = {k: evaluate(self.model, s, *args) for k, s in self.eval_splits().items()}
        row: dict[str, Any] = {f"{k}/{m}": v for k, got in measured.items() for m, v in got.items()}
        row["train_test_gap"] = row["train_slice/acc"] - row["test/acc"]
        result.timings["eval_s"] += time.perf_counter() - t0
        self.sinks.log(position(counter, self.plan) | row, kind="eval")
        for c in self.callbacks:
            c.on_evaluation(counter, run, row)


def position(counter: StepCounter, plan: StepPlan) -> dict[str, Any]:
    """The four coordinates every row carries; ``epoch`` counts completed epochs, fractional."""
    return {
        "optimizer_step": counter.optimizer_steps,
        "micro_batch": counter.micro_batches,
        "epoch": round(counter.micro_batches / plan.micro_batches_per_epoch, 6),
        "samples_seen": counter.samples_seen,
    }
