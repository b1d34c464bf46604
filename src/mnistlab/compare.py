"""Comparing runs locally: the table over run folders, and the sweep's ``sweep_summary.csv``.

Every run folder holds a ``summary.json``; a sweep folder holds one run folder per job.
``python -m mnistlab.compare outputs/multirun/<day>/<time>`` (also ``mnistlab-compare``)
prints one row per run with the overrides that tell the runs apart; ``--csv`` exports it,
``--plot METRIC`` draws that metric from every run's ``metrics.jsonl``. It reads only files,
so it works offline, on single runs and on several sweeps at once.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .errors import UserError, report
from .files import atomic_write_bytes

log = logging.getLogger("mnistlab")

COLUMNS = (
    "run",
    "overrides",
    "status",
    "test/acc",
    "test/loss",
    "bn/gap_mean",
    "counted_steps",
    "planned_steps",
    "wall_s",
    "error",
)


def find_runs(paths: list[Path]) -> list[Path]:
    """Every folder under ``paths`` (or ``paths`` themselves) that holds a ``summary.json``."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "summary.json").is_file():
            found.append(p)
        else:
            found += sorted((s.parent for s in p.rglob("summary.json")), key=_natural)
    return found


def _natural(path: Path) -> list[Any]:
    """Job folders 0, 1, ..., 10 in numeric order, not 0, 1, 10, 2."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def row_of(run: Path) -> dict[str, Any]:
    s = json.loads((run / "summary.json").read_text())
    final = s.get("final", {})
    return {
        "run": str(run),
        "overrides": " ".join(s.get("overrides", [])),
        "status": s.get("status", "unknown"),
        "test/acc": final.get("test/acc"),
        "test/loss": final.get("test/loss"),
        "bn/gap_mean": final.get("bn/gap_mean"),
        "counted_steps": s.get("counted", {}).get("total_steps"),
        "planned_steps": s.get("plan", {}).get("total_steps"),
        "wall_s": s.get("timings", {}).get("wall_s"),
        "error": s.get("error", ""),
        **{k: v for k, v in final.items() if not isinstance(v, (dict, list))},
    }


def to_csv(rows: list[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def with_objective(columns: Sequence[str], metric: str) -> list[str]:
    """``columns`` with the objective's column (``objective.metric``) right after ``status``."""
    rest = [c for c in columns if c != metric]
    at = rest.index("status") + 1
    return [*rest[:at], metric, *rest[at:]]


def best(rows: list[dict[str, Any]], metric: str, direction: str) -> dict[str, Any] | None:
    """The row with the best value of ``metric`` (``objective.direction``), or None."""
    scored = [r for r in rows if _number(r.get(metric)) is not None]
    pick = max if direction == "maximize" else min
    return pick(scored, key=lambda r: r[metric]) if scored else None


class SweepSummary(Callback):
    """At the end of a ``-m`` sweep: write ``sweep_summary.csv`` (with the objective's column)
    and name the best job; exit non-zero if a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = find_runs([sweep_dir])
        rows = [row_of(r) for r in runs]
        keys = differing_overrides(rows)
        for row in rows:
            row.update(parse_overrides(row["overrides"]))
        metric, direction = config.objective.metric, config.objective.direction
        columns = ["run", *keys, *with_objective(COLUMNS[1:], metric)]
        atomic_write_bytes(sweep_dir / "sweep_summary.csv", to_csv(rows, columns).encode())
        top = best(rows, metric, direction)
        if top is not None:
            log.info("best job by %s (%s): %s = %.4g [%s]", metric, direction, top["run"],
                     top[metric], top["overrides"])  # fmt: skip
        offline = offline_wandb_runs(runs)
        if offline:
            log.info(
                "W&B: %d offline runs; upload them with: wandb sync %s",
                len(offline),
                " ".join(map(str, offline)),
            )
        failed = [r for r in rows if r["status"] != "completed"]
        if failed:
            log.error(
                "%d of %d jobs did not complete (%s); see %s",
                len(failed),
                len(rows),
                "; ".join(f"[{r['overrides']}] {r['status']}" for r in failed),
                sweep_dir / "sweep_summary.csv",
            )
            sys.exit(1)


# --- the table ----------------------------------------------------------------------------------

SHOWN = ("status", "test/acc", "bn/gap_mean", "counted_steps", "wall_s")
X_AXES = ("optimizer_step", "samples_seen")


class CompareError(UserError):
    """A user mistake (no runs there, an unknown metric): one line, exit code 2."""


def parse_overrides(overrides: str | Sequence[str]) -> dict[str, str]:
    """``"+experiment=x optimizer.lr=0.1"`` -> ``{"experiment": "x", "optimizer.lr": "0.1"}``.

    Hydra writes an override as ``key=value`` with an optional ``+``, ``++`` or ``~`` prefix;
    values never hold spaces unless quoted, which ``summary.json``'s list form keeps intact.
    """
    items = overrides.split() if isinstance(overrides, str) else list(overrides)
    out: dict[str, str] = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.lstrip("+~")] = value
    return out


def differing_overrides(rows: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value is not the same in every run (missing counts as different),
    in the order they first appear: the knobs that tell the runs apart."""
    parsed = [parse_overrides(r["overrides"]) for r in rows]
    keys = list(dict.fromkeys(k for p in parsed for k in p))
    return [k for k in keys if len({p.get(k) for p in parsed}) > 1]


def label_runs(runs: list[Path]) -> list[str]:
    """Each run's path below their common folder: ``0``, ``1``; ``12-00-00/3`` across sweeps."""
    if len(runs) == 1:
        return [runs[0].name]
    common = Path(os.path.commonpath([r.resolve() for r in runs]))
    return [str(r.resolve().relative_to(common)) for r in runs]


def table(
    paths: Sequence[Path], sort: str | None = "test/acc", ascending: bool = False
) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of the comparison, sorted by ``sort`` (missing values last)."""
    runs = find_runs(list(paths))
    if not runs:
        raise CompareError(
            f"no run folders (with a summary.json) under {' '.join(map(str, paths))}"
        )
    rows = [row_of(r) for r in runs]
    for row, label in zip(rows, label_runs(runs), strict=True):
        row["run"] = label
    keys = differing_overrides(rows) if len(rows) > 1 else []
    for row in rows:
        row.update({k: v for k, v in parse_overrides(row["overrides"]).items() if k in keys})
    columns = ["run", *keys, *(["overrides"] if not keys else []), *SHOWN]
    if sort:
        known = set().union(*rows)
        if sort not in known:
            raise CompareError(
                f"--sort {sort!r} is not a column; one of: {', '.join(sorted(known))}"
            )
        if sort not in columns:
            columns.append(sort)
        present = [r for r in rows if _number(r.get(sort)) is not None]
        present.sort(key=lambda r: _number(r[sort]), reverse=not ascending)  # type: ignore[arg-type,return-value]
        rows = present + [r for r in rows if _number(r.get(sort)) is None]
    return columns, rows


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return None if math.isnan(v) else float(v)
    return None


def _cell(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A plain aligned text table: numbers right-aligned, text left-aligned."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [
        all(_number(r.get(c)) is not None or r.get(c) is None for r in rows) for c in columns
    ]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def offline_wandb_runs(runs: Sequence[Path]) -> list[Path]:
    """The offline W&B runs inside these run folders (``<run>/wandb/offline-run-*``)."""
    return [p for r in runs for p in sorted((Path(r) / "wandb").glob("offline-run-*"))]


# --- the plot -----------------------------------------------------------------------------------


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(
    paths: Sequence[Path], metric: str, x: str = "optimizer_step", out: Path | None = None
) -> Path:
    """A PNG of ``metric`` against ``x``, one line per run, labelled by its differing overrides.

    Uses matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch).
    """
    if x not in X_AXES:
        raise CompareError(f"--x {x!r} is not allowed: one of {', '.join(X_AXES)}")
    runs = find_runs(list(paths))
    if not runs:
        raise CompareError(
            f"no run folders (with a summary.json) under {' '.join(map(str, paths))}"
        )
    rows = [row_of(r) for r in runs]
    keys = differing_overrides(rows)
    labels = label_runs(runs)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    seen: set[str] = set()
    drawn = 0
    for run, row, name in zip(runs, rows, labels, strict=True):
        points = []
        for m in read_metrics(run):
            seen.update(m)
            if _number(m.get(metric)) is not None and x in m:
                points.append((m[x], m[metric]))
        if not points:
            continue
        chosen = parse_overrides(row["overrides"])
        label = " ".join(f"{k}={chosen.get(k, '-')}" for k in keys) or row["overrides"] or name
        if row["status"] != "completed":
            label += f" ({row['status']})"
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, label=label, marker="." if len(xs) <= 30 else None)
        drawn += 1
    if not drawn:
        logged = sorted(seen - set(X_AXES) - {"micro_batch", "epoch"})
        raise CompareError(f"--plot {metric!r}: no run logged it; logged: {', '.join(logged)}")
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} over {len(runs)} run(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    out = Path(out) if out else Path(paths[0]) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', metric)}.png"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(out, buf.getvalue())
    return out


# --- the command line ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mnistlab.compare",
        description="Compare runs: a table of run folders (a sweep, a single run, or several).",
    )
    p.add_argument("paths", nargs="+", type=Path, help="run or sweep folders")
    p.add_argument("--sort", default="test/acc", help="column or final metric (default test/acc)")
    p.add_argument("--asc", action="store_true", help="sort ascending (default: descending)")
    p.add_argument("--csv", type=Path, metavar="PATH", help="also write the table as CSV")
    p.add_argument("--plot", metavar="METRIC", help="write a PNG of METRIC for every run")
    p.add_argument("--x", default="optimizer_step", choices=X_AXES, help="the plot's x-axis")
    p.add_argument(
        "--out", type=Path, metavar="PATH", help="PNG path (default <first path>/METRIC.png)"
    )
    args = p.parse_args(argv)
    try:
        for path in args.paths:
            if not path.exists():
                raise CompareError(f"{path} does not exist")
        columns, rows = table(args.paths, args.sort, args.asc)
        print(render(columns, rows))
        if args.csv:
            atomic_write_bytes(args.csv, to_csv(rows, columns).encode())
            print(f"wrote {args.csv}")
        if args.plot:
            print(f"wrote {plot(args.paths, args.plot, args.x, args.out)}")
    except CompareError as e:
        return report(str(e))
    offline = offline_wandb_runs(find_runs(list(args.paths)))
    if offline:
        print(
            f"\nW&B: {len(offline)} offline run(s). Browse one: wandb leet {offline[0].parent}; "
            "upload them: wandb sync <run>/wandb/offline-run-*"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
