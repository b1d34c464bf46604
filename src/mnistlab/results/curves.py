"""Metrics of many runs over steps (``compare --plot``): one panel per metric, one line (or
seed group's mean and ±std band) per run, as a PNG."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mnistlab.core.files import atomic_write_bytes
from mnistlab.results import aggregate
from mnistlab.results.aggregate import number
from mnistlab.results.folders import (
    SEED,
    X_AXES,
    CompareError,
    differing_overrides,
    existing_runs,
    label_runs,
    parse_overrides,
    read_metrics,
    row_of,
    seed_groups,
)

log = logging.getLogger("mnistlab")


def plot(
    paths: Sequence[Path],
    metrics: str | Sequence[str],
    x: str = "optimizer_step",
    out: Path | None = None,
    logy: bool = False,
    per_run: bool = False,
) -> Path:
    """A PNG of ``metrics`` against ``x`` (one panel each; see :func:`figure`), written to
    ``out`` or next to the first folder as ``<metric>[+<metric>...].png``."""
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    fig = figure(paths, metrics, x, logy, per_run)
    name = "+".join(re.sub(r"[^A-Za-z0-9_.-]+", "_", m) for m in metrics)
    out = Path(out) if out else Path(paths[0]) / f"{name}.png"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(out, buf.getvalue())
    return out


def figure(
    paths: Sequence[Path],
    metrics: Sequence[str],
    x: str = "optimizer_step",
    logy: bool = False,
    per_run: bool = False,
) -> Any:
    """A matplotlib Figure with one panel per metric: a line per run labelled by its differing
    overrides, or, for runs that differ only in ``trainer.seed``, their mean with a ±std band
    (``per_run``: a line per run regardless). Uses the Agg canvas directly (no pyplot, no
    display, no global backend switch)."""
    if x not in X_AXES:
        raise CompareError(f"--x {x!r} is not allowed: one of {', '.join(X_AXES)}")
    runs = existing_runs(paths)
    rows = [row_of(r) for r in runs]
    seeds = None if per_run else seed_groups(rows)
    groups = seeds or [[i] for i in range(len(runs))]
    labels = _line_labels(rows, groups, label_runs(runs), aggregated=seeds is not None)
    logged = [read_metrics(r) for r in runs]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 2 + 3 * len(metrics)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics, strict=True):
        drawn = 0
        for group, label in zip(groups, labels, strict=True):
            points = [_points(logged[i], metric, x) for i in group]
            drawn += _draw(ax, [p for p in points if p], label)
        if not drawn:
            seen = {k for rows_ in logged for m in rows_ for k in m}
            if metric in seen:  # logged, but never as a number (NaN, infinite, null)
                raise CompareError(f"--plot {metric!r}: every value logged is NaN or infinite")
            names = sorted(seen - set(X_AXES) - {"micro_batch"})
            raise CompareError(f"--plot {metric!r}: no run logged it; logged: {', '.join(names)}")
        ax.set_ylabel(metric)
        ax.set_yscale("log" if logy else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1].set_xlabel(x)
    axes[0].set_title(f"{', '.join(metrics)} over {len(runs)} run(s)")
    return fig


def _points(rows: list[dict[str, Any]], metric: str, x: str) -> list[tuple[float, float]]:
    return [(m[x], m[metric]) for m in rows if number(m.get(metric)) is not None and x in m]


def _line_labels(
    rows: list[dict[str, Any]], groups: list[list[int]], names: list[str], aggregated: bool
) -> list[str]:
    """Each line's label: the overrides that tell it apart (without the seed when seeds are
    aggregated), ``(n seeds)`` for a group, the status of a run that did not complete."""
    keys = [k for k in differing_overrides(rows) if k != SEED or not aggregated]
    out = []
    for group in groups:
        row = rows[group[0]]
        chosen = parse_overrides(row["overrides"])
        label = " ".join(f"{k}={chosen.get(k, '-')}" for k in keys)
        label = label or row["overrides"] or names[group[0]]
        if len(group) > 1:
            label += f" ({len(group)} seeds)"
        failed = [rows[i]["status"] for i in group if rows[i]["status"] != "completed"]
        if failed:
            label += f" ({', '.join(failed)})"
        out.append(label)
    return out


def _draw(ax: Any, runs: list[list[tuple[float, float]]], label: str) -> int:
    """One run's line, or a group's mean line and ±std band; how many lines were drawn."""
    if not runs:
        return 0
    if len(runs) == 1:
        xs, ys = zip(*runs[0], strict=True)
        ax.plot(xs, ys, label=label, marker="." if len(xs) <= 30 else None)
        return 1
    xs, mean, std, _ = aggregate.series(runs)
    (line,) = ax.plot(xs, mean, label=label, marker="." if len(xs) <= 30 else None)
    ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
    return 1
