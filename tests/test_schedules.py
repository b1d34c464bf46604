"""Learning-rate schedules: each one's rates against its formula, sized from the counted
optimizer steps under accumulation, padded shards and drop_last, and resumed bit for bit."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DistributedSampler

from mnistlab.config import SchedulerConfig
from mnistlab.core.errors import ConfigError
from mnistlab.engine import checkpoint, schedules
from mnistlab.engine.data import Split
from mnistlab.engine.loop import Loop, LoopConfig
from mnistlab.engine.regularizers import Regularizer
from mnistlab.engine.steps import Cadence, StepPlan
from mnistlab.plan import main as plan_main

from faults import KillAfterSave, KillAtMicroBatch, override
from support import TorchThreads, app, read_jsonl, read_summary, run_app


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one torch thread each test (see ``support.TorchThreads``)."""
    with TorchThreads(1):
        yield


LR = 0.1


class Rows:
    """A sink that keeps every row the loop logs."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def log(self, row: dict[str, Any], kind: str = "step") -> None:
        self.rows.append(row)


def train(
    plan: StepPlan, cfg: SchedulerConfig, rank: int = 0
) -> tuple[torch.optim.lr_scheduler.LRScheduler | None, list[float], int]:
    """The real loop on rank ``rank``'s shard of a tiny problem, a row at every step:
    (the scheduler, each step's logged rate, the optimizer steps counted)."""
    torch.manual_seed(0)
    x, y = torch.randn(plan.num_samples, 1, 2, 2), torch.randint(0, 3, (plan.num_samples,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    scheduler = schedules.build(cfg, opt, plan.total_steps)
    rows = Rows()
    loop_cfg = LoopConfig(seed=0, cadence=Cadence.of(plan.total_steps, rows=1), rank=rank)
    split = Split(x, y)
    reg = Regularizer([])
    loop = Loop(model, opt, reg, plan, split, split, rows, loop_cfg, (), None, scheduler)
    counter = loop.fit().counter
    lrs = [r["lr"] for r in rows.rows if "lr" in r]
    assert [r["optimizer_step"] for r in rows.rows if "lr" in r] == list(range(1, len(lrs) + 1))
    return scheduler, lrs, counter.optimizer_steps


def windows_brute_force(plan: StepPlan, rank: int) -> int:
    """Optimizer steps on one rank, counted by walking torch's own DistributedSampler and
    BatchSampler and closing a window every ``grad_accum`` micro-batches and at epoch end."""
    steps = 0
    for epoch in range(plan.epochs):
        sampler = DistributedSampler(
            range(plan.num_samples), plan.world_size, rank, seed=0, drop_last=plan.drop_last
        )
        sampler.set_epoch(epoch)
        open_window = 0
        for _ in BatchSampler(sampler, plan.batch_size, plan.drop_last):
            open_window += 1
            if open_window == plan.grad_accum:
                steps, open_window = steps + 1, 0
        steps += open_window > 0
    return steps


# --- each schedule against its formula (index i = optimizer step - 1, T = total steps) -----


def cos_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


def formula(cfg: SchedulerConfig, i: int, total: int, lr: float = LR) -> float:
    if cfg.name == "constant":
        return lr
    if cfg.name == "step":
        size = cfg.step_size or total // 3
        return lr * cfg.gamma ** (i // size)
    if cfg.name == "cosine":
        return cos_anneal(lr, cfg.min_lr, i / total)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_fraction * total)
    if cfg.name == "warmup_cosine":
        if i < warmup:
            return lr * (i + 1) / (warmup + 1)
        return cos_anneal(lr, cfg.min_lr, (i - warmup) / (total - warmup))
    # onecycle, torch's documented phases: up until step pct*T - 1, down until step T - 1
    start, end_up = lr / cfg.div_factor, cfg.warmup_fraction * total - 1
    floor = start / cfg.final_div_factor
    if i <= end_up:
        return cos_anneal(start, lr, i / end_up)
    return cos_anneal(lr, floor, (i - end_up) / (total - 1 - end_up))


SCHEDULES = {
    "constant": SchedulerConfig(),
    "step": SchedulerConfig("step", step_size=4, gamma=0.5),
    "step_third": SchedulerConfig("step"),
    "cosine": SchedulerConfig("cosine", min_lr=0.01),
    "onecycle": SchedulerConfig("onecycle", warmup_fraction=0.3),
    "warmup_cosine": SchedulerConfig("warmup_cosine", warmup_steps=3, min_lr=0.01),
    "warmup_cosine_fraction": SchedulerConfig("warmup_cosine", warmup_fraction=0.25),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_each_schedule_logs_the_rate_of_its_formula(name: str) -> None:
    """Every step's row holds the rate that step trained at: index step - 1 of the formula."""
    cfg = SCHEDULES[name]
    plan = StepPlan(50, 4, 4, 1, 3, drop_last=False)  # 13 micro-batches: 5 windows, 20 steps
    scheduler, lrs, steps = train(plan, cfg)
    assert steps == plan.total_steps == 20 and len(lrs) == 20
    want = [formula(cfg, i, 20) for i in range(20)]
    assert lrs == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert (scheduler is None) == (name == "constant")  # constant: no scheduler object
    if name != "constant":
        assert len(set(lrs)) > 2  # the rate really moves


# --- sized from the counted steps --------------------------------------------------------

SHAPES = {
    # N, epochs, batch, world, accum, drop_last
    "short last window": (50, 3, 4, 1, 3, False),  # 13 micro-batches: windows 3,3,3,3,1
    "padded shard": (50, 2, 4, 3, 2, False),  # 17 per rank (1 padded): 5 micro-batches
    "drop_last": (50, 2, 4, 3, 2, True),  # 16 per rank: 4 micro-batches
    "padded, one short window": (37, 2, 5, 2, 3, False),  # 19 per rank: 4 micro-batches
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", ["step_third", "cosine", "onecycle", "warmup_cosine"])
def test_schedule_ends_at_the_counted_optimizer_steps(shape: str, name: str) -> None:
    plan = StepPlan(*SHAPES[shape])
    cfg = SCHEDULES[name]
    for rank in range(plan.world_size):
        scheduler, lrs, steps = train(plan, cfg, rank)
        assert scheduler is not None
        assert scheduler.last_epoch == steps == windows_brute_force(plan, rank)
        assert steps == plan.total_steps and steps != plan.textbook_steps
        if name in ("cosine", "warmup_cosine"):  # the cosine ends at min_lr exactly then
            assert scheduler.get_last_lr()[0] == pytest.approx(cfg.min_lr, abs=1e-12)
        if name == "onecycle":  # the last step trains at the cycle's floor
            assert lrs[-1] == pytest.approx(LR / cfg.div_factor / cfg.final_div_factor)
            with pytest.raises(ValueError, match="Tried to step"):  # sized to exactly these
                scheduler.step()


def test_warmup_must_leave_steps_and_resume_may_not_resize() -> None:
    with pytest.raises(ConfigError, match=r"scheduler.warmup_steps=20 .* fewer than the run's 20"):
        schedules.warmup_steps(SchedulerConfig("warmup_cosine", warmup_steps=20), 20)
    # a fixed-size step schedule and the constant rate can be extended; the others can't
    schedules.check_resume(SchedulerConfig("step", step_size=10), 3, 5)
    schedules.check_resume(SchedulerConfig(), 3, 5)
    schedules.check_resume(SchedulerConfig("cosine"), 3, 3)
    for cfg in (SchedulerConfig("step"), SchedulerConfig("cosine"), SchedulerConfig("onecycle")):
        with pytest.raises(ConfigError, match=r"trainer.epochs=5 .* 3, as when the run started"):
            schedules.check_resume(cfg, 3, 5)


def test_schedule_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Before any work, through the planning command (the training app runs the same checks)."""
    cases = {
        ("scheduler=warmup_cosine", "scheduler.warmup_steps=5000"): "scheduler.warmup_steps=5000",
        ("scheduler=step", "scheduler.gamma=0"): "scheduler.gamma=0",
        ("scheduler=cosine", "scheduler.min_lr=1.0"): "optimizer.lr=0.05",
        ("scheduler=onecycle", "scheduler.warmup_fraction=1.0"): "scheduler.warmup_fraction",
        ("scheduler=linear",): "one of constant, cosine, onecycle, step, warmup_cosine",
    }
    for overrides, needle in cases.items():
        assert plan_main(list(overrides)) == 2, overrides
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert plan_main(["scheduler=warmup_cosine", "scheduler.warmup_steps=100"]) == 0


# --- resume ----------------------------------------------------------------------------

# 220 samples less a validation part of 20: 200 to train, batch 16, windows of 3 -> 5 steps an
# epoch, 15 in all; checkpoints every 2 steps, a row every step (every rate is compared).
TINY = (
    "trainer.epochs=3",
    "dataset.limit_train=220",
    "dataset.val_size=20",
    "trainer.batch_size=16",
    "trainer.grad_accum=3",
    "trainer.checkpoint_every_n_steps=2",
    "trainer.log_every_n_steps=1",
    "scheduler=onecycle",
    "trainer.num_threads=1",
    "trainer.progress=none",
    "logger=none",
)


def killed_app(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """The app in a process of its own, for the runs a fault SIGKILLs."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    return run_app(run_dir, *overrides, env=env)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted")
    p = app(run, *TINY)
    assert p.returncode == 0, p.stderr[-2000:]
    return run


@pytest.mark.slow
def test_killed_and_resumed_run_logs_the_same_rates(uninterrupted: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # mid-window in epoch 1 (micro-batch 8); then right after the resumed run's first save
    kills = [override("kill", KillAtMicroBatch, at=8), override("kill", KillAfterSave, nth=1)]
    for i, fault in enumerate(kills):
        p = killed_app(run, *TINY, *(("trainer.resume=true",) if i else ()), *fault)
        assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    p = app(run, *TINY, "trainer.resume=true")
    assert p.returncode == 0, p.stderr[-2000:]
    rows, want = read_jsonl(run / "metrics.jsonl"), read_jsonl(uninterrupted / "metrics.jsonl")
    rates = [r["lr"] for r in rows if "lr" in r]
    assert rates == [r["lr"] for r in want if "lr" in r] and len(rates) == 15
    onecycle = [formula(SCHEDULES["onecycle"], i, 15, lr=0.05) for i in range(15)]
    assert rates == pytest.approx(onecycle, rel=1e-9)
    assert rows == want  # and every other number with them
    assert read_summary(run)["final"] == read_summary(uninterrupted)["final"]


@pytest.mark.slow
def test_resume_refuses_more_epochs_under_a_sized_schedule(
    uninterrupted: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    p = app(run, *TINY, "trainer.resume=true", "trainer.epochs=4")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "trainer.epochs=4" in errors[0] and "onecycle" in errors[0]
    assert (run / "metrics.jsonl").read_bytes() == (uninterrupted / "metrics.jsonl").read_bytes()
    state = torch.load(run / checkpoint.LAST, weights_only=True)
    assert state["scheduler"]["last_epoch"] == 15  # the schedule's state is in the checkpoint
