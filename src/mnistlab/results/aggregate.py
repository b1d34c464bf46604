"""Repeats of one configuration (runs that differ only in their seed) as one result: a value
as ``mean ± std (n)``, a curve as its mean with a ±std band.

The spread is the sample standard deviation (``ddof=1``): the seeds are a sample of the
seeds one could have drawn. One value has no spread (NaN). Pure functions over numbers, so
:mod:`mnistlab.compare` and its tests share them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Stat:
    """One column of a group of runs: the mean, the sample std (NaN for one value), the count."""

    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        mean = f"{self.mean:.4g}"
        if self.n < 2:
            return f"{mean} ({self.n})"
        return f"{mean} ± {self.std:.2g} ({self.n})"


def number(v: Any) -> float | None:
    """``v`` as a float if it is a number (not a bool, not NaN; a :class:`Stat`: its mean)."""
    if isinstance(v, Stat):
        return v.mean
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if math.isnan(v) else float(v)


def stat(values: Sequence[Any]) -> Stat | None:
    """Mean, sample std and count of the numbers among ``values`` (None, NaN and text are
    left out); None when there are none."""
    xs = np.array([x for x in map(number, values) if x is not None], dtype=np.float64)
    if xs.size == 0:
        return None
    std = float(xs.std(ddof=1)) if xs.size > 1 else math.nan
    return Stat(float(xs.mean()), std, int(xs.size))


def merge_text(values: Sequence[Any]) -> Any:
    """One cell for several runs' text: the value if they agree, else each distinct value
    with its count (``2×completed,diverged``)."""
    distinct = Counter("" if v is None else str(v) for v in values)
    if len(distinct) == 1:
        return values[0]
    return ",".join(f"{n}×{v}" if n > 1 else v for v, n in distinct.items())


def merge_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> dict[str, Any]:
    """One row for a group of runs: numeric columns as :class:`Stat`, text merged."""
    out: dict[str, Any] = {}
    for c in columns:
        values = [r.get(c) for r in rows]
        numeric = all(number(v) is not None or v is None for v in values)
        present = [v for v in values if v is not None]
        if present and numeric:
            out[c] = stat(present)
        elif present:
            out[c] = merge_text(values)
    return out


def series(
    runs: Sequence[Sequence[tuple[float, float]]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Several runs' ``(x, y)`` points as one curve: ``(xs, mean, std, n)`` at every x any
    run logged, over the runs that logged it (a run that stopped early leaves the rest to
    the others); std is NaN where fewer than two runs are left."""
    xs = np.array(sorted({x for run in runs for x, _ in run}), dtype=np.float64)
    where = {x: i for i, x in enumerate(xs.tolist())}
    grid = np.full((len(runs), len(xs)), np.nan)
    for r, run in enumerate(runs):
        for x, y in run:
            grid[r, where[float(x)]] = y
    n = (~np.isnan(grid)).sum(axis=0)
    mean = np.nansum(grid, axis=0) / np.maximum(n, 1)
    mean[n == 0] = np.nan
    squares = np.nansum((grid - mean) ** 2, axis=0)
    std = np.full(len(xs), np.nan)
    np.sqrt(squares / np.maximum(n - 1, 1), out=std, where=n > 1)
    return xs, mean, std, n
