"""Comparing runs locally: the table over run folders, and the sweep's ``sweep_summary.csv``.

Every run folder holds a ``summary.json``; a sweep folder holds one run folder per job.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .sinks import atomic_write_bytes

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
            found += sorted(s.parent for s in p.rglob("summary.json"))
    return found


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
    }


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


class SweepSummary(Callback):
    """At the end of a ``-m`` sweep: write ``sweep_summary.csv``; exit non-zero if a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = [row_of(r) for r in find_runs([sweep_dir])]
        atomic_write_bytes(sweep_dir / "sweep_summary.csv", to_csv(rows).encode())
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
