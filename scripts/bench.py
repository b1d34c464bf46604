#!/usr/bin/env python
"""mnistlab's benchmark: every performance figure quoted in the repo comes from this script.

One process measures, side by side, on MNIST-format data (the real IDX files in ``--data``
when present, else generated IDX files of the same shape, read by torchvision's own class):

* our training loop against a pytorch/examples ``mnist/main.py``-style loop (torchvision
  MNIST, per-sample ``ToTensor``/``Normalize``, ``DataLoader`` batch 64, same model, same
  optimizer, same threads);
* the machine's float32 GEMM rate, and the training FLOP/s of MLPs at batch 512 as a
  fraction of it;
* overheads as shares of training time (exact BN statistics, W&B offline, evaluation);
* start-up to the first optimizer step, a 10-job ``-m`` sweep, and thread counts.

Usage::

    python scripts/bench.py                  # full run (a few minutes on 2 cores)
    python scripts/bench.py --quick          # small sample counts (the smoke test's)
    python scripts/bench.py --device cuda    # the GPU path (scripts/gpu_check.sh)
    python scripts/bench.py --markdown docs/bench_rows.md   # also write the markdown table

Rows are a list of functions (``ROWS``); a row whose feature is missing from this build
prints ``n/a (not available in this build)`` instead of failing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from mnistlab import data, models  # noqa: E402
from mnistlab.config import register, validate  # noqa: E402
from mnistlab.optim import build_optimizer  # noqa: E402
from mnistlab.threads import resolve_threads  # noqa: E402

NA = "n/a (not available in this build)"
# Seconds the mnist FLOP row keeps alternating our loop and the bare loop (full run).
FLOPS_WINDOW_S = 40


@dataclass
class Row:
    name: str
    value: str
    ratio: str = ""
    target: str = ""
    ok: bool | None = None  # None: reported, no target
    note: str = ""


@dataclass
class Bench:
    quick: bool
    device: str
    threads: int
    root: Path
    real_data: bool
    work: Path
    gemm_peak: float = 0.0  # FLOP/s, filled by the GEMM row
    gemm_shape: tuple[int, int, int] = (1024, 1024, 1024)  # the GEMM row's fastest product
    results: dict[str, Any] = field(default_factory=dict)

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full


# ---------------------------------------------------------------------------------------
# helpers


def write_idx(root: Path, n_train: int, n_test: int) -> None:
    """MNIST's raw layout (IDX3 images, IDX1 labels): learnable fake digits, same shape."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for k in range(10):  # class k lights its own 5x5 block
            r, c = divmod(k, 5)
            images[labels == k, r * 10 : r * 10 + 5, c * 5 : c * 5 + 5] += 180
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x0803, n, 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x0801, n) + labels.tobytes()
        )


def compose(overrides: list[str]) -> Any:
    """The config exactly as ``python -m mnistlab.train <overrides>`` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    validate(cfg)
    return cfg


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ours(b: Bench, overrides: list[str]) -> tuple[dict[str, Any], float, Path]:
    """One in-process run of the real app's ``train_job``: (summary, seconds, run folder)."""
    from mnistlab.job import run as run_job

    base = [f"trainer.accelerator={b.device}", "trainer.progress=none"]
    if not any(o.startswith("logger=") for o in overrides):
        base.append("logger=none")
    cfg = compose(base + overrides)
    out = Path(tempfile.mkdtemp(dir=b.work, prefix="run-"))
    sync(b.device)
    t0 = time.perf_counter()
    summary = run_job(cfg, out)
    sync(b.device)
    elapsed = time.perf_counter() - t0
    if summary.get("status") != "completed":
        raise RuntimeError(f"run {overrides} ended {summary.get('status')}: {summary.get('error')}")
    return summary, elapsed, out


def train_rate(summary: dict[str, Any]) -> float:
    """Samples per second of training alone: the loop's evaluations and exact BN-statistics
    passes are taken out (each has its own share row)."""
    t = summary["timings"]
    extra = t.get("eval_s", 0.0) + (t.get("bn_stats_s") or 0.0)
    return summary["counted"]["samples_seen"] / max(1e-9, t["train_s"] - extra)


def mnist_overrides(b: Bench, model: str, n: int, batch: int = 64, epochs: int = 1) -> list[str]:
    return [
        "dataset=mnist",
        f"dataset.root={b.root}",
        "dataset.download=false",
        f"dataset.limit_train={n}",
        "dataset.limit_test=1000",
        f"model={model}",
        f"trainer.batch_size={batch}",
        f"trainer.epochs={epochs}",
        f"trainer.eval_every_n_epochs={epochs}",
    ]


def baseline_rate(b: Bench, model_name: str, samples: int, num_workers: int) -> float:
    """pytorch/examples ``mnist/main.py``'s loop: samples/s after its first batch."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    cfg = compose(mnist_overrides(b, model_name, samples))
    m, o = cfg.model, cfg.optimizer
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
    )
    ds = datasets.MNIST(str(b.root), train=True, download=False, transform=transform)
    kwargs: dict[str, Any] = {"batch_size": 64, "shuffle": True, "num_workers": num_workers}
    if num_workers > 0 and b.device == "cuda":
        kwargs["pin_memory"] = True
    loader = DataLoader(ds, **kwargs)
    torch.manual_seed(0)
    device = torch.device(b.device)
    model = models.build(m, (1, 28, 28), 10, 0.0)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum)
    model.train()
    seen, t0 = 0, 0.0
    for batch_idx, (x, y) in enumerate(loader):
        if batch_idx == 1:  # the first batch (worker start, allocator warm-up) is not timed
            sync(b.device)
            t0, seen = time.perf_counter(), 0
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = F.nll_loss(F.log_softmax(model(x), dim=1), y)
        loss.backward()
        optimizer.step()
        if batch_idx % 10 == 0:  # log_interval=10: examples read the loss there
            loss.item()
        seen += len(y)
        if seen >= samples and batch_idx >= 1:
            break
    sync(b.device)
    return seen / (time.perf_counter() - t0)


def bare_step_parts(b: Bench, overrides: list[str], batch: int) -> tuple[float, dict[str, float]]:
    """The same model, data and SGD trained by a bare loop (gather, forward, backward, step;
    no logging, BN points, checkpoints or bookkeeping): samples/s over one epoch, and the
    seconds per step of each part. What eager PyTorch itself reaches on this machine."""
    cfg = compose([*overrides, f"trainer.batch_size={batch}"])
    m = cfg.model
    ds = data.load(cfg.dataset)
    x_all, y_all = ds.train.x.to(b.device), ds.train.y.to(b.device)
    torch.manual_seed(0)
    model = models.build(m, ds.image_shape, 10, 0.0)
    model = model.to(b.device).train()
    optimizer = build_optimizer(
        cfg.optimizer, model.parameters()
    )  # the app's own: the same implementation
    parts = dict.fromkeys(("gather", "forward", "backward", "optimizer"), 0.0)
    order = torch.randperm(len(x_all), device=b.device)
    sync(b.device)
    t_start = time.perf_counter()
    for idx in order.split(batch):
        t0 = time.perf_counter()
        x, y = x_all.index_select(0, idx), y_all.index_select(0, idx)
        sync(b.device)
        t1 = time.perf_counter()
        loss = F.cross_entropy(model(x), y, reduction="sum") / len(idx)
        sync(b.device)
        t2 = time.perf_counter()
        loss.backward()
        sync(b.device)
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(b.device)
        t4 = time.perf_counter()
        for k, dt_ in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            parts[k] += dt_
    rate = len(x_all) / (time.perf_counter() - t_start)
    steps = math.ceil(len(x_all) / batch)
    return rate, {k: v / steps for k, v in parts.items()}


def gemm_rate(n: int, k: int, m: int, device: str, seconds: float) -> float:
    """float32 ``torch.mm`` FLOP/s of an (n x k) @ (k x m) product, best of repeated runs."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, k, generator=g).to(device)
    bm = torch.randn(k, m, generator=g).to(device)
    out = torch.empty(n, m, device=device)
    flops = 2.0 * n * k * m
    reps = max(1, int(2e8 / flops))
    for _ in range(2):
        torch.mm(a, bm, out=out)
    best, spent = 0.0, 0.0
    while spent < seconds:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, bm, out=out)
        sync(device)
        dt_ = time.perf_counter() - t0
        spent += dt_
        best = max(best, flops * reps / dt_)
    return best


def train_flops_per_sample(model: torch.nn.Module, shape: tuple[int, ...], batch: int) -> float:
    """Matrix-product FLOPs of one training step per sample, as torch's own ``FlopCounterMode``
    counts the ops really dispatched. Not the ``6 x weights`` rule: the first layer computes no
    gradient for its input, so its backward does half the work that rule assumes."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def env_for(threads: int) -> dict[str, str]:
    src = str(REPO / "src")
    path = os.environ.get("PYTHONPATH", "")
    return dict(
        os.environ,
        PYTHONPATH=f"{src}{os.pathsep}{path}" if path else src,
        OMP_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
        WANDB_SILENT="true",
    )


def app(args: list[str], threads: int, capture_stderr: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env=env_for(threads),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE if capture_stderr else subprocess.DEVNULL,
        text=True,
    )


def wait(p: subprocess.Popen[str], timeout: float = 600) -> str:
    _, err = p.communicate(timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, p.args))} exited {p.returncode}: {(err or '')[-400:]}"
        )
    return err or ""


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def fmt_rate(x: float) -> str:
    return f"{x:,.0f} samples/s"


def fmt_flops(x: float) -> str:
    return f"{x / 1e9:,.1f} GFLOP/s"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------
# rows


def row_machine(b: Bench) -> list[Row]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    desc = f"{cpu}, {cores} cores, {platform.system()} {platform.release()}"
    if b.device == "cuda":
        desc += f", GPU {torch.cuda.get_device_name()}"
    note = (
        f"torch {torch.__version__}, Python {platform.python_version()}, {b.threads} thread(s), "
        f"data: {'real MNIST files' if b.real_data else 'generated MNIST-shaped IDX files'}"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    note += f", load average at start {load:.2f}"
    return [Row("machine", desc, note=note)]


def row_gemm(b: Bench) -> list[Row]:
    secs = 0.3 if b.quick else 1.5
    sizes = [1024] if b.quick else [1024, 2048]
    if b.device == "cuda":
        sizes = [4096, 8192]
    rates = {(s, s, s): gemm_rate(s, s, s, b.device, secs) for s in sizes}
    rates[512, 784, 128] = gemm_rate(512, 784, 128, b.device, secs)  # the mnist mlp's layer 1
    b.gemm_shape = max(rates, key=lambda k: rates[k])
    b.gemm_peak = rates[b.gemm_shape]
    layer = rates.pop((512, 784, 128))
    note = ", ".join(f"{s}x{s}: {fmt_flops(r)}" for (s, _, _), r in rates.items())
    note += f"; mlp's (512x784)@(784x128): {fmt_flops(layer)}"
    return [Row("gemm_fp32", fmt_flops(b.gemm_peak), note=note)]


def _throughput(
    b: Bench, model: str, samples: int, workers: list[int], target: float | None
) -> list[Row]:
    repeats = 1 if b.quick else 2
    mine, base = [], {w: [] for w in workers}
    ours(b, mnist_overrides(b, model, 256))  # warm-up: lazy library set-up is not timed either
    for _ in range(repeats):  # alternate, keep the best of each: the machine is shared
        summary, _, _ = ours(b, mnist_overrides(b, model, samples))
        mine.append(train_rate(summary))
        for w in workers:
            base[w].append(baseline_rate(b, model, samples, w))
    rows = []
    for w in workers:
        r = max(mine) / max(base[w])
        rows.append(
            Row(
                f"throughput_{model}" + (f"_nw{w}" if w else ""),
                f"{fmt_rate(max(mine))} vs {fmt_rate(max(base[w]))}",
                ratio=f"{r:.1f}x",
                target=f">= {target:g}x" if target and not w else "",
                ok=(r >= target) if target and not w else None,
                note=f"ours vs pytorch/examples loop, batch 64, DataLoader num_workers={w}, "
                f"{samples} samples",
            )
        )
    return rows


def row_throughput_mlp(b: Bench) -> list[Row]:
    return _throughput(b, "mlp", b.n(30000, 3000), [0, 1], 4.0)


def row_throughput_cnn(b: Bench) -> list[Row]:
    return _throughput(b, "cnn", b.n(6000, 1280), [0], None)


def _flops_row(
    b: Bench,
    name: str,
    overrides: list[str],
    what: str,
    target: bool = True,
    runs: list[dict[str, Any]] | None = None,
    window: str = "",
) -> Row:
    if runs is None:
        runs = [ours(b, [*overrides, "trainer.batch_size=512"])[0] for _ in range(b.n(5, 1))]
    best = max(train_rate(s) for s in runs)  # best of several: single runs vary by ±10%
    b.results[name] = best
    cfg = compose(overrides)
    m = cfg.model
    shape = (1, 8, 8) if cfg.dataset.name == "digits" else (1, 28, 28)
    net = models.build(m, shape, 10, 0.0)
    flops = train_flops_per_sample(net, shape, 512)
    frac = best * flops / b.gemm_peak if b.gemm_peak else float("nan")
    note = f"{what}; {fmt_rate(best)}, best of {len(runs)}"
    if len(runs) > 2:  # the spread a shared machine gives the same loop
        note += f" {window}({_spread([train_rate(s) for s in runs], flops, b.gemm_peak)})"
    return Row(
        name,
        fmt_flops(best * flops),
        ratio=pct(frac) + " of GEMM",
        target=">= 50%" if target else "",
        ok=frac >= 0.5 if target else None,
        note=note,
    )


def _spread(rates: list[float], flops: float, peak: float) -> str:
    """The median and the worst of several runs' samples/s, as fractions of the GEMM rate."""
    rates = sorted(rates)
    return (
        f"median {pct(rates[len(rates) // 2] * flops / peak)}, worst {pct(rates[0] * flops / peak)}"
    )


def _bare_row(
    b: Bench, overrides: list[str], ours_rate: float, runs: list[tuple[float, dict[str, float]]]
) -> Row:
    """Our loop against the bare loop on the same config: what our bookkeeping costs."""
    (rate, parts), (_, low_parts) = max(runs, key=lambda r: r[0]), min(runs, key=lambda r: r[0])
    cfg = compose(overrides)
    m = cfg.model
    net = models.build(m, (1, 28, 28), 10, 0.0)
    flops = train_flops_per_sample(net, (1, 28, 28), 512)
    frac = rate * flops / b.gemm_peak

    def shown(p: dict[str, float]) -> str:
        return ", ".join(f"{k} {v * 1e6:,.0f} us" for k, v in p.items())

    return Row(
        "flops_mlp_mnist_bare_b512",
        f"{pct(frac)} of GEMM",
        ratio=f"ours {ours_rate / rate:.2f}x",
        note=f"bare loop, same model, data and SGD: {fmt_rate(rate)}, best of {len(runs)} "
        f"({_spread([r for r, _ in runs], flops, b.gemm_peak)}); per step of the best: "
        f"{shown(parts)}" + (f"; of the worst: {shown(low_parts)}" if len(runs) > 2 else ""),
    )


def row_flops(b: Bench) -> list[Row]:
    e_digits = b.n(40, 4)
    n_mnist = b.n(60000, 2048)  # one whole MNIST epoch, as a user's run would train
    digits = [f"trainer.epochs={e_digits}", f"trainer.eval_every_n_epochs={e_digits}"]
    wide = mnist_overrides(b, "mlp", b.n(10240, 1024), batch=512)
    mnist = mnist_overrides(b, "mlp", n_mnist, batch=512)
    ours_runs, bare_runs = [], []
    # Alternate, so both loops meet the same moments of a shared machine, for at least
    # FLOPS_WINDOW_S: the host drifts between a fast and a slow state that last 10-60 s each.
    t_end = time.perf_counter() + b.n(FLOPS_WINDOW_S, 0)
    # The GEMM rate is sampled between the runs too, and its best over the bench divides them
    # all: best against best, from the same window.
    peak_before, gemm_secs = b.gemm_peak, 0.05 if b.quick else 0.2
    while len(ours_runs) < b.n(5, 1) or time.perf_counter() < t_end:
        ours_runs.append(ours(b, [*mnist, "trainer.batch_size=512"])[0])
        bare_runs.append(bare_step_parts(b, mnist, 512))
        b.gemm_peak = max(b.gemm_peak, gemm_rate(*b.gemm_shape, b.device, gemm_secs))
    mnist_row = _flops_row(
        b,
        "flops_mlp_mnist_b512",
        mnist,
        "default mlp (784-128-64-10) on MNIST, one epoch",
        runs=ours_runs,
        window=f"over {b.n(FLOPS_WINDOW_S, 0)} s ",
    )
    if b.gemm_peak > peak_before:
        mnist_row.note += f"; GEMM rate {fmt_flops(b.gemm_peak)} (best sampled between runs)"
    return [
        _flops_row(  # 8x8 inputs: products too small to run at the GEMM rate; reported only
            b, "flops_mlp_digits_b512", digits, "default mlp (64-128-64-10) on digits", False
        ),
        mnist_row,
        _bare_row(b, mnist, b.results["flops_mlp_mnist_b512"], bare_runs),
        _flops_row(
            b,
            "flops_mlp_wide_b512",
            [*wide, "model.hidden=[1024,1024]"],
            "mlp 784-1024-1024-10 on MNIST (GEMM-sized layers)",
        ),
    ]


def _shares(b: Bench, label: str, overrides: list[str]) -> list[Row]:
    repeats = 1 if b.quick else 5  # W&B's service process makes single runs noisy
    plain: list[tuple[dict[str, Any], float]] = []
    wandb: list[tuple[dict[str, Any], float, Path]] = []
    wandb_ok = importlib.util.find_spec("wandb") is not None
    for _ in range(repeats):
        s, t, _ = ours(b, overrides)
        plain.append((s, t))
        if wandb_ok:
            wandb.append(ours(b, [*overrides, "logger=wandb", "logger.wandb.mode=offline"]))
    best = min(plain, key=lambda p: p[1])
    timings = best[0]["timings"]
    rows = []
    # exact BN statistics: the pass's own time (timings.bn_stats_s) over the training time
    share = timings["bn_stats_s"] / timings["train_s"]
    rows.append(
        Row(
            f"share_bn_stats_{label}",
            f"{timings['bn_stats_s']:.3f} s of {timings['train_s']:.3f} s",
            ratio=pct(share),
            target="<= 10%",
            ok=share <= 0.10,
            note="default bn_stats cadence; timings.bn_stats_s / train_s",
        )
    )
    # W&B offline: step time (train_s) with the sink vs without it; start and finish beside
    if not wandb or not all((w[2] / "wandb").is_dir() for w in wandb):
        rows.append(Row(f"share_wandb_{label}", NA, target="<= 5%"))
    else:
        w_best = min(wandb, key=lambda w: w[0]["timings"]["train_s"])[0]["timings"]
        t_w, t_0 = w_best["train_s"], min(p[0]["timings"]["train_s"] for p in plain)
        share = (t_w - t_0) / t_0
        start_finish = w_best.get("wandb_init_s", 0.0) + w_best.get("wandb_finish_s", 0.0)
        rows.append(
            Row(
                f"share_wandb_{label}",
                f"{t_w:.3f} s vs {t_0:.3f} s of training",
                ratio=pct(share),
                target="<= 5%",
                ok=share <= 0.05,
                note="logger=wandb logger.wandb.mode=offline vs logger=none, train_s (best of "
                f"{repeats}); W&B start + finish outside training: {start_finish:.2f} s per run",
            )
        )
    share = timings["eval_s"] / timings["train_s"]
    rows.append(
        Row(
            f"share_eval_{label}",
            f"{timings['eval_s']:.3f} s of {timings['train_s']:.3f} s",
            ratio=pct(share),
            note="per-epoch test evaluation inside the training time",
        )
    )
    return rows


def row_overheads_default(b: Bench) -> list[Row]:
    return _shares(b, "default", [] if not b.quick else ["trainer.epochs=3"])


def row_overheads_mnist(b: Bench) -> list[Row]:
    n, e = b.n(10000, 1000), b.n(2, 1)
    return _shares(
        b,
        "mnist_mlp",
        [
            "dataset=mnist",
            f"dataset.root={b.root}",
            "dataset.download=false",
            f"dataset.limit_train={n}",
            "model=mlp",
            f"trainer.epochs={e}",
        ],
    )


def row_startup(b: Bench) -> list[Row]:
    runs = b.work / "startup"
    common = ["-m", "mnistlab.train", "trainer.epochs=1", "logger=none", "trainer.progress=none"]
    common += [f"trainer.accelerator={b.device}", f"trainer.num_threads={b.threads}"]
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
    heavy = ("torchvision", "wandb", "matplotlib", "sklearn")
    names = {line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if "|" in line}
    seen = {h for h in heavy if any(n == h or n.startswith(h + ".") for n in names)}
    tops = {}
    for line in err.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and not parts[2].startswith("  "):  # top-level imports only
            with contextlib.suppress(ValueError):
                tops[parts[2].strip()] = int(parts[1]) / 1e6
    biggest = sorted(tops.items(), key=lambda kv: -kv[1])[:4]
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


def row_sweep(b: Bench) -> list[Row]:
    d = b.work / "sweep"
    jobs = 10
    args = [
        "-m",
        "mnistlab.train",
        "-m",
        f"hydra.sweep.dir={d}",
        f"trainer.seed=range({jobs})",
        "trainer.epochs=1",
        "logger=none",
        "trainer.progress=none",
        f"trainer.accelerator={b.device}",
        f"trainer.num_threads={b.threads}",
    ]
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
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    if b.device == "cuda" or cores < 2:
        return [
            Row("threads_1_vs_2", "n/a (CPU only, 2+ cores)"),
            Row("threads_oversubscribed", "n/a (CPU only, 2+ cores)"),
        ]
    n = b.n(10000, 640)
    over = mnist_overrides(b, "mlp", n, batch=64)
    rates = {}
    for k in (1, 2):
        with threads(k):
            rates[k] = train_rate(ours(b, over)[0])
    conc = {}
    for k in (1, 2):
        procs, dirs = [], []
        for j in range(2):
            d = b.work / f"threads-{k}-{j}"
            dirs.append(d)
            args = ["-m", "mnistlab.train", f"hydra.run.dir={d}", "logger=none", *over]
            procs.append(app([*args, f"trainer.num_threads={k}", "trainer.progress=none"], k))
        for p in procs:
            wait(p)
        conc[k] = sum(read_summary(d)["timings"]["samples_per_s"] for d in dirs)
    auto_two = resolve_threads("auto", 1, 2)
    return [
        Row(
            "threads_1_vs_2",
            f"{fmt_rate(rates[1])} vs {fmt_rate(rates[2])}",
            ratio=f"{rates[2] / rates[1]:.2f}x",
            note=f"one run, mnist mlp batch 64, {n} samples; auto = {resolve_threads('auto')} here",
        ),
        Row(
            "threads_oversubscribed",
            f"{fmt_rate(conc[1])} vs {fmt_rate(conc[2])}",
            ratio=f"{conc[2] / conc[1]:.2f}x",
            note=f"two concurrent runs, total: {auto_two} thread each (auto for 2 parallel jobs) "
            f"vs 2 threads each (oversubscribed: {2 * 2} threads on {cores} cores)",
        ),
    ]


def row_cuda(b: Bench) -> list[Row]:
    """bf16 autocast, torch.compile and channels_last cnn, each against fp32 eager.

    Each variant first trains a short untimed run: CUDA's lazy set-up and the compilation
    happen there (compiled code is reused by a new model of the same shapes), and the
    compile run's wall time is reported beside its speed. Then the variants alternate, best
    of two: a few hundred steps on a GPU are short enough for one hiccup to show."""
    if b.device != "cuda":
        return []
    n, epochs = b.n(30720, 4096), b.n(2, 1)
    variants = {"fp32": [], "bf16": ["trainer.precision=bf16"], "compile": ["trainer.compile=true"]}
    rows = []
    for model in ("mlp", "cnn"):
        over = mnist_overrides(b, model, n, batch=512, epochs=epochs)
        warm_s = {}
        for label, extra in variants.items():
            t0 = time.perf_counter()
            ours(b, [*mnist_overrides(b, model, 2048, batch=512), *extra])
            warm_s[label] = time.perf_counter() - t0
        rates: dict[str, list[float]] = {label: [] for label in variants}
        for _ in range(b.n(2, 1)):
            for label, extra in variants.items():
                rates[label].append(train_rate(ours(b, [*over, *extra])[0]))
        base = max(rates["fp32"])
        for label in ("bf16", "compile"):
            rate = max(rates[label])
            note = f"batch 512, {n} samples x {epochs} epoch(s)"
            note += ", channels_last" if model == "cnn" else ""
            if label == "compile":
                note += f"; warm-up run with compilation: {warm_s[label]:.1f} s wall"
            rows.append(
                Row(
                    f"cuda_{model}_{label}",
                    f"{fmt_rate(rate)} vs {fmt_rate(base)} fp32 eager",
                    ratio=f"{rate / base:.2f}x",
                    note=note,
                )
            )
    return rows


ROWS: list[Callable[[Bench], list[Row]]] = [
    row_machine,
    row_gemm,
    row_throughput_mlp,
    row_throughput_cnn,
    row_flops,
    row_overheads_default,
    row_overheads_mnist,
    row_startup,
    row_sweep,
    row_threads,
    row_cuda,
]

# Every row name the CPU bench prints (the smoke test checks each one).
ROW_NAMES = [
    "machine",
    "gemm_fp32",
    "throughput_mlp",
    "throughput_mlp_nw1",
    "throughput_cnn",
    "flops_mlp_digits_b512",
    "flops_mlp_mnist_b512",
    "flops_mlp_mnist_bare_b512",
    "flops_mlp_wide_b512",
    "share_bn_stats_default",
    "share_wandb_default",
    "share_eval_default",
    "share_bn_stats_mnist_mlp",
    "share_wandb_mnist_mlp",
    "share_eval_mnist_mlp",
    "startup_first_step",
    "startup_heavy_imports",
    "sweep_10_jobs",
    "threads_1_vs_2",
    "threads_oversubscribed",
]


def verdict(r: Row) -> str:
    return "" if r.ok is None else ("ok" if r.ok else "MISSED")


def markdown(rows: list[Row]) -> str:
    lines = ["| row | measured | ratio / share | target | | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r.name, r.value, r.ratio, r.target, verdict(r), r.note]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sample counts (about a minute)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--threads", default="auto", help="torch threads ('auto' as trainer.num_threads)"
    )
    ap.add_argument("--data", default="data", help="root holding MNIST/raw IDX files, if any")
    ap.add_argument("--markdown", type=Path, help="also write the markdown table to this file")
    ap.add_argument("--only", nargs="*", help="run only these row functions (e.g. row_gemm)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible here", file=sys.stderr)
        return 2
    n_threads = resolve_threads(args.threads)
    torch.set_num_threads(n_threads)
    os.environ.setdefault("WANDB_SILENT", "true")
    start = time.perf_counter()
    failed = []
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="mnistlab-bench-") as tmp:
        work = Path(tmp)
        root = Path(args.data)
        real = (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
        if not real:
            root = work / "data"
            write_idx(root, *((12000, 2000) if args.quick else (60000, 10000)))
        b = Bench(args.quick, args.device, n_threads, root.resolve(), real, work)
        print(
            f"mnistlab bench ({'quick' if args.quick else 'full'}, {args.device}), "
            f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
            flush=True,
        )
        for fn in ROWS:
            if args.only and fn.__name__ not in args.only:
                continue
            t0 = time.perf_counter()
            try:
                got = fn(b)
            except Exception as e:  # one broken row must not hide the others
                failed.append(fn.__name__)
                got = [Row(fn.__name__, f"failed: {type(e).__name__}: {e}", ok=False)]
            for r in got:
                head = f"{r.name:<26} {r.value:<44} {r.ratio:>14} {r.target:>12}"
                print(f"{head} {verdict(r):>6}  {r.note}", flush=True)
            rows += got
            print(
                f"  ({fn.__name__}: {time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True
            )
    table = markdown(rows)
    print("\nMarkdown rows for docs/benchmarks.md:\n")
    print(table)
    print(f"bench took {time.perf_counter() - start:.0f} s")
    if args.markdown:
        from mnistlab.files import atomic_write_bytes

        atomic_write_bytes(args.markdown, table.encode())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
