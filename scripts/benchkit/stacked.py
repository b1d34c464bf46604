"""Rows on ``hydra/launcher=stacked``: one 16-job sweep (4 seeds x 4 learning rates) run by
Hydra's basic launcher and by the stacked one, one after the other, each a ``python -m
mnistlab.train -m`` subprocess in its own sweep folder; and the stacked group's training
FLOP/s as a share of the machine's GEMM rate. On the default digits config and on the
bench's MNIST-format data."""

from __future__ import annotations

import importlib.util
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mnistlab.engine import data, models, regularizers
from mnistlab.engine.optim import build_optimizer

from .common import NA, Bench, Row, fmt_flops, fmt_rate, gemm_rate, pct, sync
from .loops import bare_step_parts, config_flops_per_sample
from .runs import app, compose, read_summary, train_cmd, wait

# The sweep both launchers run: 16 jobs that differ only in keys a stack lets differ (the
# quick smoke run: 2 of them, still one group).
SWEEP = ("trainer.seed=range(4)", "optimizer.lr=0.01,0.02,0.05,0.1")
QUICK_SWEEP = ("trainer.seed=range(2)", "optimizer.lr=0.1")
TARGET = 5.0  # jobs' own time, basic / stacked


@dataclass
class Sweep:
    """One launcher's run of the sweep: what the bench reads back from its folder."""

    wall: float  # the whole command, interpreter start to exit
    jobs_s: float  # the jobs' own time (see ``_jobs_seconds``)
    rate: float  # training samples/s: all jobs' samples over their training time
    groups: Counter[int]  # group size -> number of groups (1: a job trained alone)
    jobs: int


def _jobs(b: Bench) -> tuple[str, ...]:
    return QUICK_SWEEP if b.quick else SWEEP


def row_stacked_digits(b: Bench) -> list[Row]:
    """The sweep on the default config: digits, mlp 64-128-64-10, 20 epochs (1 when quick)."""
    epochs = b.n(20, 1)
    overrides = [f"trainer.epochs={epochs}"]
    return _rows(b, "digits", overrides, f"default config (digits, mlp), {epochs} epochs")


def row_stacked_mnist(b: Bench) -> list[Row]:
    """The sweep on MNIST-format data, shortened to fit: one epoch of part of the split."""
    n = b.n(12000, 1000)
    overrides = [
        "dataset=mnist",
        f"dataset.root={b.root}",
        "dataset.download=false",
        f"dataset.limit_train={n}",
        "dataset.limit_test=1000",
        "trainer.epochs=1",
    ]
    what = f"mnist mlp, 1 epoch, dataset.limit_train={n} dataset.limit_test=1000"
    return _rows(b, "mnist", overrides, what)


def row_stacked_steps(b: Bench) -> list[Row]:
    """The computation alone: 16 copies of the default MLP stepped as one stack (gather,
    forward, backward, update; no rows, BN points, evaluation or checkpoints) against one copy
    in a bare eager loop, batch 32, on digits and on the bench's MNIST-format data."""
    if importlib.util.find_spec("mnistlab.sweeps.stack") is None:
        return [Row("stacked_steps_digits", NA), Row("stacked_steps_mnist", NA)]
    mnist = ["dataset=mnist", f"dataset.root={b.root}", "dataset.download=false",
             f"dataset.limit_train={b.n(12000, 2000)}"]  # fmt: skip
    rows = []
    for label, overrides in (("digits", []), ("mnist", mnist)):
        alone, _ = bare_step_parts(b, overrides, 32)
        stacked = _stacked_rate(b, overrides, 32, 16)
        b.gemm_peak = max(b.gemm_peak, gemm_rate(*b.gemm_shape, b.device, 0.3 if b.quick else 1.5))
        flops = config_flops_per_sample(overrides)
        rows.append(
            Row(
                f"stacked_steps_{label}",
                f"{fmt_rate(stacked)} vs {fmt_rate(alone)}",
                ratio=f"{stacked / alone:.1f}x",
                note=f"16 copies of the {label} MLP as one Stack vs one copy's bare eager "
                f"loop (the app's optimizer), batch 32, one epoch each; the stack reaches "
                f"{pct(stacked * flops / b.gemm_peak)} of the GEMM rate, one copy "
                f"{pct(alone * flops / b.gemm_peak)}",
            )
        )
    return rows


def _stacked_rate(b: Bench, overrides: list[str], batch: int, copies: int) -> float:
    """Samples/s of ``copies`` copies (seeds 0.., rates spread over a decade) trained one epoch
    each, as one :class:`mnistlab.sweeps.stack.Stack`."""
    from mnistlab.sweeps.stack import Stack

    cfg = compose([*overrides, f"trainer.batch_size={batch}"])
    ds = data.load(cfg.dataset)
    x_all, y_all = ds.train.x.to(b.device), ds.train.y.to(b.device)
    built = []
    for j in range(copies):
        torch.manual_seed(j)
        model = models.build(cfg.model, ds.image_shape, 10, 0.0).to(b.device)
        opt = build_optimizer(cfg.optimizer, model.parameters())
        for group in opt.param_groups:
            group["lr"] = cfg.optimizer.lr * 10 ** (j / copies - 0.5)
        built.append((model, opt, regularizers.build(model, cfg.regularizer)))
    gens = [torch.Generator(b.device).manual_seed(j) for j in range(copies)]
    stack = Stack(*(list(t) for t in zip(*built, strict=True)), gens)
    lrs = [opt.param_groups[0]["lr"] for _, opt, _ in built]
    n = len(x_all)
    orders = torch.stack([torch.randperm(n, device=b.device) for _ in range(copies)])
    sync(b.device)
    t0 = time.perf_counter()
    for idx in orders.split(batch, dim=1):
        x = x_all.index_select(0, idx.flatten()).view(copies, idx.shape[1], *x_all.shape[1:])
        y = y_all.index_select(0, idx.flatten()).view(copies, -1)
        out = stack.forward(x)
        sums = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none")
        (sums.view(copies, -1).sum(1) / idx.shape[1]).sum().backward()
        stack.step(lrs)
    sync(b.device)
    return copies * n / (time.perf_counter() - t0)


def _rows(b: Bench, label: str, overrides: list[str], what: str) -> list[Row]:
    """Both launchers on the same sweep, basic first: the jobs' time, the command's time and
    the stacked group's share of the GEMM rate."""
    names = [f"stacked_sweep_{label}", f"stacked_sweep_{label}_wall", f"stacked_flops_{label}"]
    if importlib.util.find_spec("mnistlab.sweeps.stacking") is None:
        return [Row(n, NA) for n in names]
    basic = _sweep(b, label, "basic", overrides)
    stacked = _sweep(b, label, "stacked", overrides)
    # The GEMM rate sampled right after, at the same moment of a shared machine; the best
    # the bench saw divides the FLOP rows, as in row_flops.
    b.gemm_peak = max(b.gemm_peak, gemm_rate(*b.gemm_shape, b.device, 0.3 if b.quick else 1.5))
    flops = config_flops_per_sample(overrides)
    jobs_ratio = basic.jobs_s / stacked.jobs_s
    groups = ", ".join(
        f"{n} group{'s' if n > 1 else ''} of {k}" for k, n in sorted(stacked.groups.items())
    )
    return [
        Row(
            names[0],
            f"{basic.jobs_s:.1f} s vs {stacked.jobs_s:.1f} s",
            ratio=f"{jobs_ratio:.1f}x",
            target=f">= {TARGET:g}x",
            ok=jobs_ratio >= TARGET,
            note=f"jobs' own time, basic / stacked: sum of wall_s vs first .hydra/config.yaml "
            f"to last summary.json; {basic.jobs} jobs ({' '.join(_jobs(b))}), {what}; stacked: "
            f"{groups}; training {fmt_rate(stacked.rate)} vs {fmt_rate(basic.rate)} "
            "(sum of samples_seen / train_s)",
        ),
        Row(
            names[1],
            f"{basic.wall:.1f} s vs {stacked.wall:.1f} s",
            ratio=f"{basic.wall / stacked.wall:.1f}x",
            note="the whole `python -m mnistlab.train -m` command, basic / stacked: start-up "
            "and Hydra's two composes of every job included",
        ),
        Row(
            names[2],
            fmt_flops(stacked.rate * flops),
            ratio=pct(stacked.rate * flops / b.gemm_peak) + " of GEMM",
            note=f"the stacked group's training: {fmt_rate(stacked.rate)} x {flops:,.0f} FLOPs "
            f"per sample (FlopCounterMode, as the flops rows); basic jobs "
            f"{pct(basic.rate * flops / b.gemm_peak)}; GEMM rate {fmt_flops(b.gemm_peak)}",
        ),
    ]


def _sweep(b: Bench, label: str, launcher: str, overrides: list[str]) -> Sweep:
    """The sweep as one subprocess with ``launcher`` ("basic" or "stacked"), in its own
    folder: its wall time and what its jobs' summaries say."""
    d = b.work / f"stacked-{label}-{launcher}"
    args = train_cmd(
        f"hydra.sweep.dir={d}",
        *_jobs(b),
        *overrides,
        f"trainer.accelerator={b.device}",
        f"trainer.num_threads={b.threads}",
        *(["hydra/launcher=stacked"] if launcher == "stacked" else []),
        multirun=True,
    )
    t0 = time.time()
    wait(app(args, b.threads), timeout=1800)
    wall = time.time() - t0
    jobs = sorted((p for p in d.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    summaries = [read_summary(j) for j in jobs]
    for j, s in zip(jobs, summaries, strict=True):
        if s.get("status") != "completed" or s.get("launcher") != launcher:
            raise RuntimeError(f"{j}: {s.get('status')} by {s.get('launcher')}: {s.get('error')}")
    # A group's jobs share one train_s: each job counts 1/k of its group's k.
    train = sum(s["timings"]["train_s"] / s.get("stacked_jobs", 1) for s in summaries)
    sizes = Counter(s.get("stacked_jobs", 1) for s in summaries)
    return Sweep(
        wall=wall,
        jobs_s=_jobs_seconds(launcher, jobs, summaries),
        rate=sum(s["counted"]["samples_seen"] for s in summaries) / train,
        groups=Counter({k: n // k for k, n in sizes.items()}),
        jobs=len(jobs),
    )


def _jobs_seconds(launcher: str, jobs: list[Path], summaries: list[dict[str, Any]]) -> float:
    """The jobs' own time: every epoch, evaluation, BN point and checkpoint, without Hydra's
    composing of each job's config or the interpreter's start-up. Basic: the sum of the
    jobs' ``wall_s``, one after the other. Stacked: the jobs train together, so the span
    from the first job's start (its ``.hydra/config.yaml``) to the last ``summary.json``."""
    if launcher == "basic":
        return sum(s["timings"]["wall_s"] for s in summaries)
    start = min((j / ".hydra" / "config.yaml").stat().st_mtime for j in jobs)
    return max((j / "summary.json").stat().st_mtime for j in jobs) - start
