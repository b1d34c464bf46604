"""CUDA rows: bf16 autocast and torch.compile against fp32 eager (``--device cuda`` only)."""

from __future__ import annotations

import time

from .common import Bench, Row, fmt_rate
from .runs import mnist_overrides, ours, train_rate

VARIANTS: dict[str, list[str]] = {
    "fp32": [],
    "bf16": ["trainer.precision=bf16"],
    "compile": ["trainer.compile=true"],
}


def row_cuda(b: Bench) -> list[Row]:
    """bf16 autocast, torch.compile and channels_last cnn, each against fp32 eager.

    Each variant first trains a short untimed run: CUDA's lazy set-up and the compilation
    happen there (compiled code is reused by a new model of the same shapes), and the
    compile run's wall time is reported beside its speed. Then the variants alternate, best
    of two: a few hundred steps on a GPU are short enough for one hiccup to show."""
    if b.device != "cuda":
        return []
    n, epochs = b.n(30720, 4096), b.n(2, 1)
    rows = []
    for model in ("mlp", "cnn"):
        over = mnist_overrides(b, model, n, batch=512, epochs=epochs)
        warm_s = _warm_up(b, model)
        rates: dict[str, list[float]] = {label: [] for label in VARIANTS}
        for _ in range(b.n(2, 1)):
            for label, extra in VARIANTS.items():
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


def _warm_up(b: Bench, model: str) -> dict[str, float]:
    """One short untimed run of each variant: its wall seconds (compilation included)."""
    warm_s = {}
    for label, extra in VARIANTS.items():
        t0 = time.perf_counter()
        ours(b, [*mnist_overrides(b, model, 2048, batch=512), *extra])
        warm_s[label] = time.perf_counter() - t0
    return warm_s
