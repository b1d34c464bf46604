"""Rows on whole processes: start-up to the first optimizer step, a 10-job ``-m`` sweep,
and torch thread counts (one run, and two concurrent runs that may oversubscribe)."""

from __future__ import annotations

import contextlib
import time

from mnistlab.processes.threads import cpu_cores

from .common import Bench, Row, fmt_rate, threads
from .runs import SPINNING, app, mnist_overrides, ours, read_summary, train_cmd, train_rate, wait


def row_startup(b: Bench) -> list[Row]:
    """Start to first optimizer step of a CLI run, and which heavy libraries it imports."""
    runs = b.work / "startup"
    common = train_cmd(
        "trainer.epochs=1", f"trainer.accelerator={b.device}", f"trainer.num_threads={b.threads}"
    )
    t0 = time.time()
    wait(app(["-c", "import torch"], b.threads))
    floor = time.time() - t0
    firsts = []
    for i in range(0 if b.quick else 3):
        d = runs / str(i)
        t0 = time.time()
        wait(app([*common, f"hydra.run.dir={d}"], b.threads))
        firsts.append(read_summary(d)["timings"]["first_step_unix"] - t0)
    t0 = time.time()
    err = wait(
        app(["-X", "importtime", *common, f"hydra.run.dir={runs / 'imports'}"], b.threads, True)
    )
    if b.quick:  # one run only, timed with -X importtime on (which adds a little)
        firsts.append(read_summary(runs / "imports")["timings"]["first_step_unix"] - t0)
    seen, biggest = _heavy_imports(err)
    return [
        Row(
            "startup_first_step",
            f"{min(firsts):.2f} s",
            note=f"`python -m mnistlab.train trainer.epochs=1` start to first optimizer step "
            f"(best of {len(firsts)}); `python -c 'import torch'` alone: {floor:.2f} s",
        ),
        Row(
            "startup_heavy_imports",
            "imported: " + (", ".join(sorted(seen)) or "none of them"),
            ok=not ({"torchvision", "wandb"} & seen),
            target="no torchvision, no wandb",
            note="default run with logger=none (W&B is imported by its sink alone), "
            "-X importtime; largest: " + ", ".join(f"{k} {v:.2f} s" for k, v in biggest),
        ),
    ]


def _heavy_imports(importtime: str) -> tuple[set[str], list[tuple[str, float]]]:
    """From ``-X importtime`` output: which heavy libraries were imported, and the four
    slowest top-level imports (name, seconds)."""
    heavy = ("torchvision", "wandb", "matplotlib", "sklearn")
    names = {line.rsplit("|", 1)[-1].strip() for line in importtime.splitlines() if "|" in line}
    seen = {h for h in heavy if any(n == h or n.startswith(h + ".") for n in names)}
    tops = {}
    for line in importtime.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and not parts[2].startswith("  "):  # top-level imports only
            with contextlib.suppress(ValueError):
                tops[parts[2].strip()] = int(parts[1]) / 1e6
    return seen, sorted(tops.items(), key=lambda kv: -kv[1])[:4]


def row_sweep(b: Bench) -> list[Row]:
    """Per-job overhead of a 10-job basic-launcher sweep, with and without start-up."""
    d = b.work / "sweep"
    jobs = 10
    args = train_cmd(
        f"hydra.sweep.dir={d}",
        f"trainer.seed=range({jobs})",
        "trainer.epochs=1",
        f"trainer.accelerator={b.device}",
        f"trainer.num_threads={b.threads}",
        multirun=True,
    )
    if b.quick:
        args.append("dataset.limit_train=320")
    t0 = time.time()
    wait(app(args, b.threads))
    wall = time.time() - t0
    t = [read_summary(d / str(i))["timings"] for i in range(jobs)]
    train = sum(x["train_s"] for x in t)
    per_job = (wall - train) / jobs
    # once the process is up: Hydra's per-job compose and set-up, ours, and the summary
    marginal = (wall - t[0]["startup_s"] - train) / jobs
    return [
        Row(
            "sweep_10_jobs",
            f"{per_job:.2f} s/job incl. start-up; {marginal:.2f} s/job without it",
            target="<= 0.5 s/job",
            ok=per_job <= 0.5,
            note=f"basic launcher, default config, 1 epoch; wall {wall:.1f} s, training "
            f"{train:.1f} s; first job's loop started {t[0]['startup_s']:.2f} s after import "
            "(data loaded once and cached for the other jobs)",
        )
    ]


def row_threads(b: Bench) -> list[Row]:
    """1 vs 2 torch threads: in one run, and in two concurrent runs (oversubscribed at 2)."""
    cores = cpu_cores()
    if b.device == "cuda" or cores < 2:
        return [
            Row("threads_1_vs_2", "n/a (CPU only, 2+ cores)"),
            Row("threads_oversubscribed", "n/a (CPU only, 2+ cores)"),
        ]
    n = b.n(10000, 320)
    over = mnist_overrides(b, "mlp", n, batch=64)
    rates = {}
    for k in (1, 2):
        with threads(k):
            rates[k] = train_rate(ours(b, over)[0])
    conc = {k: _concurrent_rate(b, over, k) for k in (1, 2)}
    return [
        Row(
            "threads_1_vs_2",
            f"{fmt_rate(rates[1])} vs {fmt_rate(rates[2])}",
            ratio=f"{rates[2] / rates[1]:.2f}x",
            note=f"one run, mnist mlp batch 64, {n} samples; auto gives this model 1 thread",
        ),
        Row(
            "threads_oversubscribed",
            f"{fmt_rate(conc[1])} vs {fmt_rate(conc[2])}",
            ratio=f"{conc[2] / conc[1]:.2f}x",
            note=f"two concurrent runs, total: 1 thread each vs 2 threads each (oversubscribed: "
            f"{2 * 2} threads on {cores} cores, waiting as mnistlab sets it: passive)",
        ),
    ]


def _concurrent_rate(b: Bench, overrides: list[str], k: int) -> float:
    """Two app processes of ``k`` threads each at once: their samples/s added."""
    procs, dirs = [], []
    for j in range(2):
        d = b.work / f"threads-{k}-{j}"
        dirs.append(d)
        procs.append(
            app(train_cmd(f"hydra.run.dir={d}", *overrides, f"trainer.num_threads={k}"), k)
        )
    for p in procs:
        wait(p)
    return sum(read_summary(d)["timings"]["samples_per_s"] for d in dirs)


def row_load(b: Bench) -> list[Row]:
    """``trainer.num_threads=auto`` beside a second CPU-heavy process (another default run)
    and alone, against 2 spinning threads alone (the thread governor's count on an idle
    machine, before counts were fixed per run); and whether the loaded run's rows are the
    lone run's, byte for byte."""
    if b.device == "cuda" or cpu_cores() < 2:
        na = "n/a (CPU only, 2+ cores)"
        names = ("threads_auto_under_load", "threads_auto_alone", "threads_auto_same_bytes")
        return [Row(n, na) for n in names]
    n = b.n(30000, 640)
    over = mnist_overrides(b, "mlp", n, batch=64)
    alone = {k: _app_rate(b, over, k, f"alone-{k}") for k in ("2", "auto")}
    other = app(train_cmd(f"hydra.run.dir={b.work / 'load-other'}", *mnist_overrides(
        b, "mlp", n, batch=64, epochs=3)), cpu_cores())  # fmt: skip
    try:
        loaded = _app_rate(b, over, "auto", "loaded")
    finally:
        wait(other)
    same = (b.work / "load-loaded" / "metrics.jsonl").read_bytes() == (
        b.work / "load-alone-auto" / "metrics.jsonl"
    ).read_bytes()
    return [
        Row(
            "threads_auto_under_load",
            f"{fmt_rate(loaded)} vs {fmt_rate(alone['auto'])} alone",
            ratio=f"{loaded / alone['auto']:.2f}x",
            target=">= 0.50x",
            ok=loaded / alone["auto"] >= 0.5,
            note=f"auto beside another auto run (mnist mlp batch 64, {n} samples); the "
            f"oversubscribed 2+2 threads row above is what a per-run count must avoid",
        ),
        Row(
            "threads_auto_alone",
            f"{fmt_rate(alone['auto'])} vs {fmt_rate(alone['2'])} at 2 spinning threads",
            ratio=f"{alone['auto'] / alone['2']:.2f}x",
            target=">= 0.90x",
            ok=alone["auto"] / alone["2"] >= 0.9,
            note="auto alone (one thread: this micro-batch is too small to split) against "
            "what the load-following governor ran alone",
        ),
        Row(
            "threads_auto_same_bytes",
            "identical" if same else "different",
            target="identical",
            ok=same,
            note="metrics.jsonl of the loaded run and of the lone run, same command",
        ),
    ]


def _app_rate(b: Bench, overrides: list[str], threads: str, name: str) -> float:
    """One app process with ``trainer.num_threads=threads``: its training samples/s."""
    d = b.work / f"load-{name}"
    k = cpu_cores() if threads == "auto" else int(threads)
    spin = SPINNING if threads != "auto" else None
    wait(app(train_cmd(f"hydra.run.dir={d}", *overrides, f"trainer.num_threads={threads}"), k,
             env=spin))  # fmt: skip
    return train_rate(read_summary(d))
