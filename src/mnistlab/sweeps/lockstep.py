"""Several jobs trained in lockstep as one stacked computation (``hydra/launcher=stacked``).

Each job of a group is an ordinary :class:`~mnistlab.app.job.Job` (its folder, sinks, BN
monitor, checkpointer and callbacks) whose model, optimizer and regularizer are one lane of
a :class:`~mnistlab.sweeps.stack.Stack`. :func:`fit` is
:meth:`Loop.fit <mnistlab.engine.loop.Loop.fit>` with lanes: the same epoch → micro-batch →
window → step walk, every lane over the data order its own seed gives; one forward, backward
and update for all lanes; then each lane's counts, row, callbacks and evaluation through its
own :class:`~mnistlab.engine.loop.Loop`.

A lane that diverges, or whose callback fails, ends alone: its outcome is kept, its lane
zeroed (nothing non-finite flows on) and the others go on. A lane that stops early ends
alone the same way, its module first copied out of the stack (it completed). SIGTERM/SIGINT
stop every lane at the next step boundary, each with its checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mnistlab.app.job import Job
from mnistlab.bn.stats import Accumulators
from mnistlab.core.errors import Interrupted, StoppedEarly
from mnistlab.engine.checkpoint import Streams, stop_on_signals
from mnistlab.engine.loop import Fit, Loop, Running, epoch_order, micro_batches, windows
from mnistlab.engine.models import autocast, bn_layers
from mnistlab.engine.steps import StepCounter
from mnistlab.sweeps.stack import Stack


@dataclass
class Lane:
    """One job of the group: its loop (rows, callbacks, evaluation), counter and sums."""

    job: Job
    run: Running  # views of the group's sums
    lr: float = 0.0  # the rate of the step being taken
    # How it ended before the group: diverged, interrupted, a bug; or its Fit if it stopped
    # early (a completed run: its lane was released, its model keeps what it ended with).
    outcome: Fit | BaseException | None = None
    fit: Fit = field(init=False)  # what the lane's loop did
    loop: Loop = field(init=False)  # the job's own: rows, callbacks, evaluation
    counter: StepCounter = field(init=False)

    def __post_init__(self) -> None:
        self.fit = Fit(self.job.counter)
        self.loop, self.counter = self.job.loop, self.job.counter


def fit(jobs: Sequence[Job], streams: Sequence[Streams]) -> list[Fit | BaseException]:
    """Train ``jobs`` (one model shape, one plan, standing at the same step) as one stack;
    each job's :class:`Fit`, or what ended it."""
    loops = [j.loop for j in jobs]
    stack = Stack(
        [j.model for j in jobs],
        [lp.optimizer for lp in loops],
        [lp.regularizer for lp in loops],
        [s.generator for s in streams],
        [lp.cfg.grad_clip_norm for lp in loops],
        [lp.cfg.grad_clip_value for lp in loops],
    )
    for job, s in zip(jobs, streams, strict=True):
        job.ckpt.rng = s.state  # a lane's checkpoint keeps the lane's own streams
    device = loops[0].train.x.device
    loss = torch.zeros(len(jobs), dtype=torch.float64, device=device)
    correct = torch.zeros(len(jobs), dtype=torch.int64, device=device)
    lanes = []
    for i, job in enumerate(jobs):
        saved = job.running or {}
        loss[i], correct[i] = saved.get("loss", 0.0), saved.get("correct", 0)
        lanes.append(Lane(job, Running(loss[i], correct[i], int(saved.get("count", 0)))))
    for lane in lanes:
        lane.fit.timings["start_at"] = time.perf_counter()
    try:
        with stop_on_signals([j.ckpt for j in jobs]):
            _walk(stack, lanes, loss, correct)
        for lane in lanes:  # a lane that stopped early ended before
            lane.fit.timings.setdefault("end_at", time.perf_counter())
    except BaseException as e:  # the stack itself failed (or a second Ctrl-C): every lane
        for lane in lanes:
            lane.outcome = lane.outcome or e
    return [lane.outcome or lane.fit for lane in lanes]


def _walk(stack: Stack, lanes: list[Lane], loss: Tensor, correct: Tensor) -> None:
    """Every lane's epochs, windows and steps, in lockstep."""
    first = lanes[0].job
    plan, train = first.plan, first.loop.train
    device = train.x.device
    start = first.counter.micro_batches  # the lanes stand at the same step
    for epoch in range(first.counter.epochs, plan.epochs):
        done = max(0, start - epoch * plan.micro_batches_per_epoch)  # resuming mid-epoch
        seeds = [lane.job.loop.cfg.seed for lane in lanes]
        orders = [epoch_order(plan, seed, epoch, 0).to(device) for seed in seeds]
        per_lane = [windows(micro_batches(o, plan)[done:], plan.grad_accum) for o in orders]
        for window in zip(*per_lane, strict=True):
            _window(stack, lanes, window, loss, correct)
            for lane in lanes:
                lane.lr = 0.0 if lane.outcome else lane.loop.optimizer.param_groups[0]["lr"]
            stack.step([lane.lr for lane in lanes])
            _measure_bn(stack, lanes)
            _each(stack, lanes, lambda lane: lane.loop.close_step(
                lane.counter, lane.run, lane.fit, lane.lr))  # fmt: skip
            if _stopped(stack, lanes):
                return
        measured = _evaluate(stack, lanes, epoch + 1)
        _each(stack, lanes, lambda ln, got=measured: ln.loop.close_epoch(
            ln.counter, ln.run, ln.fit, got.get(id(ln))))  # fmt: skip
        if _stopped(stack, lanes):
            return


@torch.inference_mode()
def _measure_bn(stack: Stack, lanes: list[Lane]) -> None:
    """At a periodic BN point (the step about to be closed), every lane's exact BN input
    statistics in one stacked pass over each lane's own probe, offered to the lane's monitor
    (which then computes its gaps as a lone run does). Small probes: the pass is per-call
    costs, paid once for all lanes instead of once per lane."""
    live = [lane for lane in lanes if lane.outcome is None]
    monitor = live[0].job.monitor if live else None
    probe = monitor.probe_at(live[0].counter.optimizer_steps + 1) if monitor else None
    if monitor is None or probe != "periodic":
        return
    sizes = {lane.job.monitor.sizes[probe] for lane in lanes}
    if len(sizes) > 1 or any(lane.job.monitor.whole(probe) for lane in lanes):
        return  # whole-set passes (large products, as fast lane by lane) or unequal probes
    t0 = time.perf_counter()
    layers = {n: m.num_features for n, m in bn_layers(stack.first).items()}
    accs = [Accumulators(layers, monitor.batch_size) for _ in lanes]
    stack.tap = lambda name, xs: [a.add(name, x) for a, x in zip(accs, xs, strict=True)]
    probes = [lane.job.monitor.probe(probe)[:2] for lane in lanes]  # each lane's own samples
    b = monitor.batch_size  # chunks of whole sub-batches, about a lone pass's chunk in all
    size = max(1, monitor.chunk_size // (b * len(lanes))) * b
    n = len(probes[0][0]) if probes[0][1] is None else len(probes[0][1])
    try:
        for start in range(0, n, size):
            end = start + size
            chunk = [x[start:end] if i is None else x.index_select(0, i[start:end])
                     for x, i in probes]  # fmt: skip
            with autocast(chunk[0].device, monitor.precision):
                stack.forward(torch.stack(chunk), training=False)
    finally:
        stack.tap = None
    seconds = time.perf_counter() - t0
    device = lanes[0].loop.train.x.device
    for lane, acc in zip(lanes, accs, strict=True):
        if lane.outcome is None:
            lane.job.monitor.offer(probe, acc.result(device), seconds)


def _evaluate(stack: Stack, lanes: list[Lane], epochs: int) -> dict[int, Any]:
    """The end-of-epoch evaluation of every lane in one stacked pass per split (the lanes
    share the data), by lane; nothing when this epoch end does not evaluate."""
    loop = lanes[0].loop
    if not loop.evaluates(epochs):
        return {}
    t0 = time.perf_counter()
    device = loop.train.x.device
    per_lane: dict[int, Any] = {id(lane): {} for lane in lanes}
    for name, split in loop.eval_splits().items():
        with autocast(device, loop.cfg.precision):
            losses, accs = stack.evaluate(split.x, split.y, loop.cfg.eval_batch_size)
        for lane, loss, acc in zip(lanes, losses.tolist(), accs.tolist(), strict=True):
            per_lane[id(lane)][name] = {"loss": loss, "acc": acc}
    for lane in lanes:  # the pass was every lane's evaluation
        lane.fit.timings["eval_s"] += time.perf_counter() - t0
    return per_lane


def _window(
    stack: Stack, lanes: list[Lane], window: tuple[list[Tensor], ...], loss: Tensor, correct: Tensor
) -> None:
    """One accumulation window: each micro-batch gathered for every lane, forward, backward.
    Each lane's window loss is its sum over the window's samples divided by their number."""
    train, precision = lanes[0].job.loop.train, lanes[0].job.loop.cfg.precision
    device, g = train.x.device, len(lanes)
    samples = sum(len(idx) for idx in window[0])
    for i in range(len(window[0])):
        idx = torch.stack([w[i] for w in window])  # [G, b]: each lane's own samples
        b = idx.shape[1]
        x = train.x.index_select(0, idx.flatten()).view(g, b, *train.x.shape[1:])
        y = train.y.index_select(0, idx.flatten()).view(g, b)
        with autocast(device, precision):
            out = stack.forward(x)
        sums = F.cross_entropy(out.float().flatten(0, 1), y.flatten(), reduction="none")
        sums = sums.view(g, b).sum(1)
        lane_loss = sums / samples
        if i == len(window[0]) - 1 and stack.adds_to_loss:
            lane_loss = lane_loss + stack.penalty()
        lane_loss.sum().backward()  # lanes share no weights: each gets its own gradient
        loss.add_(sums.detach())
        correct.add_((out.detach().argmax(2) == y).sum(1))
        _each(stack, lanes, lambda ln, b=b: ln.loop.count_micro_batch(ln.counter, ln.run, b))


def _each(stack: Stack, lanes: list[Lane], step: Callable[[Lane], None]) -> None:
    """``step(lane)`` for every lane still training; what one raises ends that lane only
    (an interrupted lane keeps its weights: it saved them; one that stopped early is
    released from the stack with them)."""
    for i, lane in enumerate(lanes):
        if lane.outcome is not None:
            continue
        try:
            step(lane)
        except StoppedEarly:
            lane.fit.timings["end_at"] = time.perf_counter()
            lane.outcome = lane.fit
            stack.release(i)
        except Exception as e:
            lane.outcome = e
            if not isinstance(e, Interrupted):
                stack.drop(i)


def _stopped(stack: Stack, lanes: list[Lane]) -> bool:
    """Every lane ended, or a stop signal ended the group. The signal reaches every lane's
    checkpointer at once, but it may land while the lanes pass the boundary one by one: the
    lanes that passed it before it came save and stop here, at the same step."""
    if any(isinstance(lane.outcome, Interrupted) for lane in lanes):
        _each(stack, lanes, lambda ln: ln.job.ckpt.on_step_end(ln.counter, ln.run))
        return True
    return all(lane.outcome for lane in lanes)
