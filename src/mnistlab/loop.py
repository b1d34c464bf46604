"""The training loop: epochs, micro-batches, accumulation windows, optimizer steps.

Read it top to bottom: an *epoch* walks this rank's shard once; an *iteration* is one
micro-batch forward and backward; a *step* is one optimizer update after ``grad_accum``
micro-batches (the epoch's last window may be shorter and still steps). The window's loss is
the sum over its samples divided by the number of samples it really holds, so every update
is the gradient of a true average. Losses and counts accumulate on the device and are read
only when a row is logged, so the GPU path has no per-step host sync.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Split
from .regularizers import Regularizer
from .sinks import Sinks
from .steps import StepCounter, StepPlan

# A hook runs after every optimizer step; it returns extra metrics to log, or None.
StepHook = Callable[[int], "dict[str, Any] | None"]
# A boundary hook runs after a step's row is logged and after each epoch's end (True), with
# the counter and the running train sums: where checkpoints are taken.
BoundaryHook = Callable[[StepCounter, "dict[str, Any]", bool], None]


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""

    def __init__(self, step: int, loss: float) -> None:
        self.step, self.loss = step, loss
        super().__init__(f"loss became {loss} at optimizer step {step}")


@dataclass
class LoopConfig:
    seed: int
    rank: int = 0
    log_every_n_steps: int = 10
    eval_every_n_epochs: int = 1
    eval_batch_size: int = 1024
    precision: str = "fp32"
    hooks: list[StepHook] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # kept out of rows: not deterministic
    boundary_hooks: list[BoundaryHook] = field(default_factory=list)
    # Test hook: SIGKILL the process after this micro-batch (a kill mid-window, for resume tests).
    kill_at_micro_batch: int | None = None


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


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    regularizer: Regularizer,
    plan: StepPlan,
    train: Split,
    test: Split,
    sinks: Sinks,
    cfg: LoopConfig,
    counter: StepCounter | None = None,
    running: dict[str, Any] | None = None,
) -> StepCounter:
    """Train for ``plan.epochs`` epochs; return what was really counted.

    To resume, pass the checkpoint's ``counter`` (taken at a window end) and ``running`` sums:
    the windows already done in the current epoch are skipped."""
    counter = counter or StepCounter()
    device = train.x.device
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)  # DDP skips all-reduce with it
    check_every = 1 if device.type == "cpu" else cfg.log_every_n_steps  # finite-loss check
    run_loss = torch.zeros((), dtype=torch.float64, device=device)
    run_correct = torch.zeros((), dtype=torch.int64, device=device)
    run_count = 0
    eval_args = (cfg.eval_batch_size, cfg.precision)
    train_slice = Split(train.x[: len(test)], train.y[: len(test)])
    if running:  # resuming: train sums since the last logged row
        run_loss.fill_(running["loss"]), run_correct.fill_(running["correct"])
        run_count = int(running["count"])
    model.train()

    for epoch in range(counter.epochs, plan.epochs):
        order = epoch_order(plan, cfg.seed, epoch, cfg.rank).to(device)  # no per-batch copies
        done = counter.micro_batches - epoch * plan.micro_batches_per_epoch  # > 0 on resume
        for window in windows(micro_batches(order, plan)[done:], plan.grad_accum):
            window_samples = sum(len(idx) for idx in window)
            for i, idx in enumerate(window):
                last = i == len(window) - 1
                x, y = train.x.index_select(0, idx), train.y.index_select(0, idx)  # gather
                with no_sync() if not last else contextlib.nullcontext():
                    with autocast(device, cfg.precision):
                        out = model(x)
                    loss_sum = F.cross_entropy(out.float(), y, reduction="sum")
                    loss = loss_sum / window_samples
                    if last and regularizer.adds_to_loss:
                        loss = loss + regularizer.penalty()
                    loss.backward()
                counter.micro_batches += 1
                counter.samples_seen += len(idx) * plan.world_size
                run_loss.add_(loss_sum.detach())  # in place, widened to float64: one op
                run_correct.add_((out.detach().argmax(1) == y).sum())
                run_count += len(idx)
                if counter.micro_batches == cfg.kill_at_micro_batch:
                    os.kill(os.getpid(), signal.SIGKILL)

            optimizer.step()
            regularizer.after_step(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad(set_to_none=True)
            counter.optimizer_steps += 1
            step = counter.optimizer_steps

            if step % check_every == 0 and not math.isfinite(run_loss.item()):
                raise Diverged(step, float(run_loss))
            row: dict[str, Any] = {}
            for hook in cfg.hooks:
                row.update(hook(step) or {})
            if step % cfg.log_every_n_steps == 0 or step == plan.total_steps:
                row["train/loss"] = float(run_loss) / max(1, run_count)
                row["train/acc"] = float(run_correct) / max(1, run_count)
                row["lr"] = optimizer.param_groups[0]["lr"]
                if not torch.isfinite(run_loss):
                    raise Diverged(step, float(run_loss))
                run_loss.zero_(), run_correct.zero_()
                run_count = 0
            if row:
                sinks.log(position(counter, plan) | row)
            sums = {"loss": run_loss, "correct": run_correct, "count": run_count}
            for boundary in cfg.boundary_hooks:
                boundary(counter, sums, False)

        counter.epochs += 1
        if counter.epochs % cfg.eval_every_n_epochs == 0 or counter.epochs == plan.epochs:
            t0 = time.perf_counter()
            row = {f"test/{k}": v for k, v in evaluate(model, test, *eval_args).items()}
            # Train accuracy in eval mode on a test-sized slice: the train-test gap, cheaply.
            row |= {
                f"train_eval/{k}": v for k, v in evaluate(model, train_slice, *eval_args).items()
            }
            row["train_test_gap"] = row["train_eval/acc"] - row["test/acc"]
            cfg.timings["eval_s"] = cfg.timings.get("eval_s", 0.0) + time.perf_counter() - t0
            sinks.log(position(counter, plan) | row)
        for boundary in cfg.boundary_hooks:
            boundary(counter, {"loss": run_loss, "correct": run_correct, "count": run_count}, True)
    return counter


def position(counter: StepCounter, plan: StepPlan) -> dict[str, Any]:
    """The four coordinates every row carries; ``epoch`` counts completed epochs, fractional."""
    return {
        "optimizer_step": counter.optimizer_steps,
        "micro_batch": counter.micro_batches,
        "epoch": round(counter.micro_batches / plan.micro_batches_per_epoch, 6),
        "samples_seen": counter.samples_seen,
    }
