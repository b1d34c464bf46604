"""The table's data model and the helpers every row shares: timing (GEMM rate, median and
worst of runs, torch threads) and formatting (rates, shares, the console and markdown lines)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

NA = "n/a (not available in this build)"


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
# timing


def sync(device: str) -> None:
    """Wait for queued CUDA work, so a host clock read covers it."""
    if device == "cuda":
        torch.cuda.synchronize()


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


def spread(rates: list[float], flops: float, peak: float) -> str:
    """The median and the worst of several runs' samples/s, as fractions of the GEMM rate."""
    rates = sorted(rates)
    return (
        f"median {pct(rates[len(rates) // 2] * flops / peak)}, worst {pct(rates[0] * flops / peak)}"
    )


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Torch's intra-op threads set to ``n`` for the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------
# formatting


def fmt_rate(x: float) -> str:
    return f"{x:,.0f} samples/s"


def fmt_flops(x: float) -> str:
    return f"{x / 1e9:,.1f} GFLOP/s"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def verdict(r: Row) -> str:
    return "" if r.ok is None else ("ok" if r.ok else "MISSED")


def console_line(r: Row) -> str:
    """One row as the bench prints it while running: fixed-width columns, note last."""
    head = f"{r.name:<26} {r.value:<44} {r.ratio:>14} {r.target:>12}"
    return f"{head} {verdict(r):>6}  {r.note}"


def markdown(rows: list[Row]) -> str:
    """The rows as the markdown table docs/benchmarks.md quotes."""
    lines = ["| row | measured | ratio / share | target | | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r.name, r.value, r.ratio, r.target, verdict(r), r.note]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"
