"""Rows on speed: the machine, its GEMM rate, our loop's throughput against the
pytorch/examples loop, and training FLOP/s as a fraction of the GEMM rate."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from mnistlab.processes.threads import cpu_cores

from .common import Bench, Row, fmt_flops, fmt_rate, gemm_rate, pct, spread
from .loops import bare_step_parts, baseline_rate, config_flops_per_sample
from .runs import mnist_overrides, ours, train_rate

# Seconds the mnist FLOP row keeps alternating our loop and the bare loop (full run).
FLOPS_WINDOW_S = 40


def row_machine(b: Bench) -> list[Row]:
    """What the figures were measured on (a busy machine makes every figure noisy)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    desc = f"{cpu}, {cpu_cores()} cores, {platform.system()} {platform.release()}"
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
    """The float32 GEMM rate: the ceiling the FLOP rows are fractions of."""
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


# ---------------------------------------------------------------------------------------
# throughput against the pytorch/examples loop


def row_throughput_mlp(b: Bench) -> list[Row]:
    """The default mlp, ours vs the examples loop at num_workers 0 (target 4x) and 1."""
    return _throughput(b, "mlp", b.n(30000, 1000), [0, 1], 4.0)


def row_throughput_cnn(b: Bench) -> list[Row]:
    """The cnn, ours vs the examples loop at num_workers 0; reported only."""
    return _throughput(b, "cnn", b.n(6000, 320), [0], None)


def _throughput(
    b: Bench, model: str, samples: int, workers: list[int], target: float | None
) -> list[Row]:
    """Ours against the examples loop at each DataLoader ``num_workers``; the target is for
    ``num_workers=0`` only."""
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


# ---------------------------------------------------------------------------------------
# FLOP/s as a fraction of the GEMM rate


def row_flops(b: Bench) -> list[Row]:
    """Training FLOP/s at batch 512 as a share of the GEMM rate: digits, MNIST, the bare
    loop on MNIST (what our bookkeeping costs) and a wide mlp."""
    e_digits = b.n(40, 4)
    n_mnist = b.n(60000, 2048)  # one whole MNIST epoch, as a user's run would train
    digits = [f"trainer.epochs={e_digits}", f"trainer.eval_every_n_epochs={e_digits}"]
    wide = mnist_overrides(b, "mlp", b.n(10240, 1024), batch=512)
    mnist = mnist_overrides(b, "mlp", n_mnist, batch=512)
    peak_before = b.gemm_peak
    ours_runs, bare_runs = _alternate_ours_and_bare(b, mnist)
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


def _alternate_ours_and_bare(
    b: Bench, mnist: list[str]
) -> tuple[list[dict[str, Any]], list[tuple[float, dict[str, float]]]]:
    """Runs of our loop and of the bare loop, one after the other: (our summaries, bare
    rates and step parts). Raises ``b.gemm_peak`` to the best GEMM rate sampled between."""
    ours_runs, bare_runs = [], []
    # Alternate, so both loops meet the same moments of a shared machine, for at least
    # FLOPS_WINDOW_S: the host drifts between a fast and a slow state that last 10-60 s each.
    t_end = time.perf_counter() + b.n(FLOPS_WINDOW_S, 0)
    # The GEMM rate is sampled between the runs too, and its best over the bench divides them
    # all: best against best, from the same window.
    gemm_secs = 0.05 if b.quick else 0.2
    while len(ours_runs) < b.n(5, 1) or time.perf_counter() < t_end:
        ours_runs.append(ours(b, [*mnist, "trainer.batch_size=512"])[0])
        bare_runs.append(bare_step_parts(b, mnist, 512))
        b.gemm_peak = max(b.gemm_peak, gemm_rate(*b.gemm_shape, b.device, gemm_secs))
    return ours_runs, bare_runs


def _flops_row(
    b: Bench,
    name: str,
    overrides: list[str],
    what: str,
    target: bool = True,
    runs: list[dict[str, Any]] | None = None,
    window: str = "",
) -> Row:
    """Training FLOP/s of our loop at batch 512 (best of ``runs``, else of fresh runs)."""
    if runs is None:
        runs = [ours(b, [*overrides, "trainer.batch_size=512"])[0] for _ in range(b.n(5, 1))]
    best = max(train_rate(s) for s in runs)  # best of several: single runs vary by ±10%
    b.results[name] = best
    flops = config_flops_per_sample(overrides)
    frac = best * flops / b.gemm_peak if b.gemm_peak else float("nan")
    note = f"{what}; {fmt_rate(best)}, best of {len(runs)}"
    if len(runs) > 2:  # the spread a shared machine gives the same loop
        note += f" {window}({spread([train_rate(s) for s in runs], flops, b.gemm_peak)})"
    return Row(
        name,
        fmt_flops(best * flops),
        ratio=pct(frac) + " of GEMM",
        target=">= 50%" if target else "",
        ok=frac >= 0.5 if target else None,
        note=note,
    )


def _bare_row(
    b: Bench, overrides: list[str], ours_rate: float, runs: list[tuple[float, dict[str, float]]]
) -> Row:
    """Our loop against the bare loop on the same config: what our bookkeeping costs."""
    (rate, parts), (_, low_parts) = max(runs, key=lambda r: r[0]), min(runs, key=lambda r: r[0])
    flops = config_flops_per_sample(overrides)
    frac = rate * flops / b.gemm_peak

    def shown(p: dict[str, float]) -> str:
        return ", ".join(f"{k} {v * 1e6:,.0f} us" for k, v in p.items())

    return Row(
        "flops_mlp_mnist_bare_b512",
        f"{pct(frac)} of GEMM",
        ratio=f"ours {ours_rate / rate:.2f}x",
        note=f"bare loop, same model, data and SGD: {fmt_rate(rate)}, best of {len(runs)} "
        f"({spread([r for r, _ in runs], flops, b.gemm_peak)}); per step of the best: "
        f"{shown(parts)}" + (f"; of the worst: {shown(low_parts)}" if len(runs) > 2 else ""),
    )
