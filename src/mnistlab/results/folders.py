"""Reading run folders: each holds a ``summary.json`` (a sweep folder holds one run folder per
job) and a ``metrics.jsonl``. The table over them (``compare``, ``sweep_summary.csv``, the
report) and the rows of their metrics, read from files only: offline, on single runs and on
several sweeps at once. Runs that differ only in ``trainer.seed`` can be one row of
``mean ± std (n)``."""

from __future__ import annotations

import csv
import difflib
import io
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mnistlab.core.errors import UserError
from mnistlab.core.files import flatten
from mnistlab.results.aggregate import Stat, merge_rows, number

log = logging.getLogger("mnistlab")

COLUMNS = (
    "run",
    "overrides",
    "status",
    "val/acc",
    "val/loss",
    "test/acc",
    "test/loss",
    "bn/gap_mean",
    "counted_steps",
    "planned_steps",
    "wall_s",
    "error",
)


def find_runs(paths: list[Path], warn: bool = True) -> list[Path]:
    """Every folder under ``paths`` (or ``paths`` themselves) that holds a readable
    ``summary.json``; a damaged one is skipped with one warning line, so one broken run does
    not hide the others."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "summary.json").is_file():
            found.append(p)
        else:
            found += sorted((s.parent for s in p.rglob("summary.json")), key=_natural)
    return [run for run in found if _readable(run, warn)]


# The parts of a summary the readers index, and the type each must have.
SHAPE = {
    "status": str,
    "final": dict,
    "config": dict,
    "counted": dict,
    "plan": dict,
    "timings": dict,
    "overrides": list,
    "error": str,
}


def shape_problem(summary: Any) -> str:
    """What makes ``summary`` unreadable as a run's summary ("" if nothing): not a JSON
    object, or a known part of another type (a hand-edited or foreign file)."""
    if not isinstance(summary, dict):
        return "not a JSON object"
    for key, kind in SHAPE.items():
        if key in summary and summary[key] is not None and not isinstance(summary[key], kind):
            return f"{key} is a {type(summary[key]).__name__}, not a {kind.__name__}"
    return ""


def _readable(run: Path, warn: bool) -> bool:
    try:
        problem = shape_problem(json.loads((run / "summary.json").read_text()))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
    if problem and warn:
        print(f"warning: skipping {run}: summary.json unreadable ({problem})", file=sys.stderr)
    return not problem


def _natural(path: Path) -> list[Any]:
    """Job folders 0, 1, ..., 10 in numeric order, not 0, 1, 10, 2."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def row_of(run: Path) -> dict[str, Any]:
    """The run's table row: the shown columns, every final metric, and (for ``--col`` and
    ``--sort``) every config value by its dotted key and every other summary value by its
    ``/``-joined path (``counted/total_micro_batches``)."""
    s = json.loads((run / "summary.json").read_text())
    final = s.get("final", {})
    return {
        **flatten({k: v for k, v in s.items() if k != "config"}, "/"),
        **flatten(s.get("config") or {}, "."),
        "run": str(run),
        "overrides": " ".join(s.get("overrides", [])),
        "status": s.get("status", "unknown"),
        "val/acc": final.get("val/acc"),
        "val/loss": final.get("val/loss"),
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
    """The table as CSV; a column of seed groups' :class:`Stat` cells becomes three
    (``<column>_mean``, ``_std``, ``_n``), NaN an empty field."""
    stats = {c for c in columns if any(isinstance(r.get(c), Stat) for r in rows)}
    fields = [f for c in columns for f in (_stat_fields(c) if c in stats else [c])]
    out = []
    for row in rows:
        flat = {c: row.get(c) for c in columns if c not in stats}
        for c in stats:
            v = row.get(c)
            parts = (v.mean, number(v.std), v.n) if isinstance(v, Stat) else (None, None, None)
            flat.update(zip(_stat_fields(c), parts, strict=True))
        out.append(flat)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(out)
    return buf.getvalue()


def _stat_fields(column: str) -> list[str]:
    return [f"{column}_mean", f"{column}_std", f"{column}_n"]


def with_objective(columns: Sequence[str], metric: str) -> list[str]:
    """``columns`` with the objective's column (``objective.metric``) right after ``status``."""
    rest = [c for c in columns if c != metric]
    at = rest.index("status") + 1
    return [*rest[:at], metric, *rest[at:]]


def best(rows: list[dict[str, Any]], metric: str, direction: str) -> dict[str, Any] | None:
    """The row with the best value of ``metric`` (``objective.direction``), or None."""
    scored = [r for r in rows if number(r.get(metric)) is not None]
    pick = max if direction == "maximize" else min
    return pick(scored, key=lambda r: r[metric]) if scored else None


# --- the table ----------------------------------------------------------------------------------

SHOWN = ("status", "val/acc", "val/loss", "test/acc", "bn/gap_mean", "counted_steps", "wall_s")
VAL = ("val/acc", "val/loss")
OBJECTIVE = "objective"  # the table's default sort: the runs' own objective.metric and direction
EXAMPLES = ("test/loss", "trainer.batch_size", "trainer.seed", "counted/total_micro_batches")
X_AXES = ("optimizer_step", "samples_seen", "epoch")


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


SEED = "trainer.seed"


def seed_groups(rows: list[dict[str, Any]]) -> list[list[int]] | None:
    """The runs (indices) that differ only in ``trainer.seed``, one list per configuration in
    the order first seen; None when no two runs differ in their seed (nothing to aggregate).
    A run without a seed override has the default seed: it joins its configuration's group."""
    if SEED not in differing_overrides(rows):
        return None
    groups: dict[tuple[tuple[str, str], ...], list[int]] = {}
    for i, row in enumerate(rows):
        rest = sorted((k, v) for k, v in parse_overrides(row["overrides"]).items() if k != SEED)
        groups.setdefault(tuple(rest), []).append(i)
    return list(groups.values())


def objective_of(rows: list[dict[str, Any]]) -> tuple[str, bool, str]:
    """What rows are ranked by when no column is asked for: the runs' objective
    (``objective.metric``, ascending when ``objective.direction`` is minimize), with a note
    ("" if none) when the runs name several objectives (the first run's wins) or none (then
    validation accuracy, else test accuracy: said so)."""
    named = list(dict.fromkeys(
        (r["objective.metric"], r.get("objective.direction")) for r in rows
        if r.get("objective.metric")
    ))  # fmt: skip
    if named:
        metric, direction = named[0]
        note = ""
        if len(named) > 1:
            others = ", ".join(f"{m} ({d})" for m, d in named)
            note = f"the runs' objectives differ ({others}): sorted by {metric}; --sort picks one"
        return metric, direction == "minimize", note
    fallback = "val/acc" if any(number(r.get("val/acc")) is not None for r in rows) else "test/acc"
    return fallback, False, f"no objective in the runs' config: sorted by {fallback}"


def table(
    paths: Sequence[Path],
    sort: str | None = OBJECTIVE,
    ascending: bool | None = None,
    cols: Sequence[str] = (),
    per_run: bool = False,
    notes: list[str] | None = None,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of the comparison, sorted by ``sort`` (missing values last; default:
    the runs' objective in its direction, its column beside ``status``; ``ascending`` None:
    descending, or the objective's direction): one row per configuration, seeds aggregated
    (:func:`seed_groups`), or one per run (``per_run``). ``cols``: extra columns, any key
    :func:`row_of` knows. Validation comes before test; runs without a validation split
    have no ``val/*`` columns. ``notes`` gets a line for each fallback taken (no split; no
    objective, or several)."""
    notes = [] if notes is None else notes
    runs = existing_runs(paths)
    rows = [row_of(r) for r in runs]
    for row, label in zip(rows, label_runs(runs), strict=True):
        row["run"] = label
    keys = differing_overrides(rows) if len(rows) > 1 else []
    for row in rows:
        row.update({k: v for k, v in parse_overrides(row["overrides"]).items() if k in keys})
    shown = list(SHOWN)
    if not any(number(r.get(k)) is not None for r in rows for k in VAL):
        shown = [c for c in shown if c not in VAL]
        notes.append("no run has a validation split (dataset.val_size=0): no val/* columns")
    columns = ["run", *keys, *(["overrides"] if not keys else []), *shown]
    known = set().union(*rows)
    for c in cols:
        check_known("--col", c, known)
    columns += [c for c in cols if c not in columns]
    if sort == OBJECTIVE:
        sort, by_direction, note = objective_of(rows)
        ascending = by_direction if ascending is None else ascending
        if note:
            notes.append(note)
        columns = with_objective(columns, sort)
    elif sort:
        check_known("--sort", sort, known)
    if sort and sort not in columns:
        columns.append(sort)
    ascending = bool(ascending)
    groups = None if per_run else seed_groups(rows)
    if groups is not None:
        rows = [merge_rows([rows[i] for i in g], columns) for g in groups]
    if sort:
        present = [r for r in rows if number(r.get(sort)) is not None]
        present.sort(key=lambda r: number(r[sort]), reverse=not ascending)  # type: ignore[arg-type,return-value]
        rows = present + [r for r in rows if number(r.get(sort)) is None]
    return columns, rows


def existing_runs(paths: Sequence[Path]) -> list[Path]:
    runs = find_runs(list(paths))
    if not runs:
        raise CompareError(
            f"no run folders (with a summary.json) under {' '.join(map(str, paths))}"
        )
    return runs


def check_known(flag: str, key: str, known: set[str]) -> None:
    """An unknown column: one line with the closest known keys (else the first few)."""
    if key in known:
        return
    close = difflib.get_close_matches(key, known, n=5, cutoff=0.6)
    if close:
        raise CompareError(f"{flag} {key!r} is not a column; did you mean: {', '.join(close)}")
    few = [k for k in (*SHOWN, *EXAMPLES) if k in known]
    raise CompareError(
        f"{flag} {key!r} is not a column; known ones include {', '.join(few)} (config values "
        "by their dotted key, summary values by their /-joined path)"
    )


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
    numeric = [all(number(r.get(c)) is not None or r.get(c) is None for r in rows) for c in columns]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def offline_wandb_runs(runs: Sequence[Path]) -> list[Path]:
    """The offline W&B runs inside these run folders (``<run>/wandb/offline-run-*``)."""
    return [p for r in runs for p in sorted((Path(r) / "wandb").glob("offline-run-*"))]


def offline_sync_globs(root: Path) -> tuple[int, list[str]]:
    """How many offline W&B folders lie under ``root``, and the few shell patterns that name
    them all (``<sweep>/*/wandb/offline-run-*``): a ``wandb sync`` line that stays short however
    many jobs a sweep has, and names every folder of a resumed run."""
    root = Path(root)
    found = sorted(root.rglob("wandb/offline-run-*"))
    patterns = {
        str(root.joinpath(*["*"] * (len(p.relative_to(root).parts) - 2), "wandb", "offline-run-*"))
        for p in found
    }
    return len(found), sorted(patterns)


# --- the plot -----------------------------------------------------------------------------------


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``; a line that does not parse (a run killed while writing
    it) is skipped with one warning line."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            row, bad = None, bad + 1
        if isinstance(row, dict):
            rows.append(row)
    if bad:
        print(f"warning: {path}: skipped {bad} unreadable line(s)", file=sys.stderr)
    return rows
