"""Comparing runs locally: the table over run folders (``sweep_summary.csv`` uses it too).

Every run folder holds a ``summary.json``; a sweep folder holds one run folder per job.
``python -m mnistlab.compare outputs/multirun/<day>/<time>`` (also ``mnistlab-compare``)
prints one row per run with the overrides that tell the runs apart, validation beside test,
sorted by the runs' objective (``objective.metric`` in its direction); runs that differ only in
``trainer.seed`` as one row of ``mean ± std (n)`` (``--runs``: one row each); ``--col`` adds
any config or summary value, ``--csv`` exports the table, ``--plot METRIC`` (repeatable) draws
metrics from every run's ``metrics.jsonl``. It reads only files, so it works offline, on
single runs and on several sweeps at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from mnistlab.core.errors import quiet_on_closed_pipe, report
from mnistlab.core.files import atomic_write_bytes
from mnistlab.results.curves import plot
from mnistlab.results.folders import (
    OBJECTIVE,
    X_AXES,
    CompareError,
    find_runs,
    offline_wandb_runs,
    render,
    table,
    to_csv,
)

log = logging.getLogger("mnistlab")


# --- the command line ---------------------------------------------------------------------------


@quiet_on_closed_pipe
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mnistlab.compare",
        description="Compare runs: a table of run folders (a sweep, a single run, or several).",
    )
    p.add_argument("paths", nargs="+", type=Path, help="run or sweep folders")
    p.add_argument(
        "--sort", default=OBJECTIVE,
        help="column or final metric (default: the runs' objective, objective.metric, in its "
        "objective.direction)",
    )  # fmt: skip
    p.add_argument(
        "--asc", action="store_true",
        help="sort ascending (default: descending, or the objective's direction)",
    )  # fmt: skip
    p.add_argument("--csv", type=Path, metavar="PATH", help="also write the table as CSV")
    p.add_argument(
        "--col", action="append", default=[], metavar="KEY",
        help="add a column (repeatable): a config key (trainer.batch_size) or a summary path "
        "(counted/total_micro_batches)",
    )  # fmt: skip
    p.add_argument(
        "--runs", action="store_true",
        help="one row (and plot line) per run; default: runs that differ only in trainer.seed "
        "as one, mean ± std (n)",
    )  # fmt: skip
    p.add_argument(
        "--plot", action="append", default=[], metavar="METRIC",
        help="plot METRIC for every run (repeatable: one panel per metric, one PNG)",
    )  # fmt: skip
    p.add_argument("--x", default="optimizer_step", choices=X_AXES, help="the plot's x-axis")
    p.add_argument("--logy", action="store_true", help="a logarithmic y-axis")
    p.add_argument(
        "--out", type=Path, metavar="PATH", help="PNG path (default <first path>/METRIC.png)"
    )
    args = p.parse_args(argv)
    try:
        for path in args.paths:
            if not path.exists():
                raise CompareError(f"{path} does not exist")
        asc, notes = True if args.asc else None, []
        columns, rows = table(args.paths, args.sort, asc, args.col, args.runs, notes)
        print(render(columns, rows))
        if args.csv:
            atomic_write_bytes(args.csv, to_csv(rows, columns).encode())
            print(f"wrote {args.csv}")
        if args.plot:
            out = plot(args.paths, args.plot, args.x, args.out, args.logy, args.runs)
            print(f"wrote {out}")
        for note in notes:  # the fallbacks the table took: no validation split, no objective
            print(f"note: {note}", file=sys.stderr)
    except CompareError as e:
        return report(str(e))
    offline = offline_wandb_runs(find_runs(list(args.paths), warn=False))
    if offline:
        print(
            f"\nW&B: {len(offline)} offline run(s). Browse one: wandb leet {offline[0].parent}; "
            "upload them: wandb sync <run>/wandb/offline-run-*"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
