"""``python -m mnistlab.report RUN_OR_SWEEP``: a run's or a sweep's pictures and
``report.md`` in ``<folder>/report/`` (:mod:`mnistlab.results.reports` draws them); ``--table``
prints a Markdown table of the runs with the commit, host and threads it was made on
(``--into`` puts it between markers in a file, e.g. the README).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mnistlab.core.errors import quiet_on_closed_pipe, report
from mnistlab.results.folders import find_runs
from mnistlab.results.reports import (
    REPORT,
    ReportError,
    Run,
    markdown_table,
    provenance,
    replace_block,
    write_report,
    write_sweep_report,
)

# --- the command line ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mnistlab.report",
        description="Pictures and a Markdown page of a run or a sweep, in <folder>/report/.",
    )
    p.add_argument("paths", nargs="+", type=Path, help="run or sweep folders")
    p.add_argument(
        "--table",
        action="store_true",
        help="print a Markdown table of the runs (with commit, host, threads) instead",
    )
    p.add_argument(
        "--columns",
        metavar="K1,K2",
        help="the table's columns: final metrics or dotted summary.json keys",
    )
    p.add_argument(
        "--into",
        type=Path,
        metavar="FILE",
        help="with --table: replace the block between <!-- report:NAME --> markers",
    )
    p.add_argument("--block", default="table", metavar="NAME", help="the block's NAME")
    p.add_argument(
        "--each", action="store_true", help="for a sweep: also write every run's own report"
    )
    return p


def _table(args: argparse.Namespace, argv: Sequence[str]) -> None:
    run_dirs = find_runs(list(args.paths))
    runs = [Run.load(p) for p in run_dirs]
    keys = [k.strip() for k in args.columns.split(",") if k.strip()] if args.columns else None
    command = " ".join(["python -m mnistlab.report", *argv])
    text = markdown_table(runs, keys) + "\n\n" + provenance(runs, command)
    if args.into:
        replace_block(args.into, args.block, text)
        print(f"wrote the table into {args.into} (block {args.block})")
    else:
        print(text)


@quiet_on_closed_pipe
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        for path in args.paths:
            if not path.exists():
                raise ReportError(f"{path} does not exist")
            if not find_runs([path]):
                raise ReportError(f"no run folders (with a summary.json) under {path}")
        if args.into and not args.table:
            raise ReportError("--into needs --table")
        if args.table:
            _table(args, argv)
            return 0
        for path in args.paths:
            if (path / "summary.json").is_file():
                written = write_report(path)
            else:
                written = write_sweep_report(path, find_runs([path]), args.each)
            print(f"wrote {len(written)} files; open {path / REPORT / 'report.md'}")
    except ReportError as e:
        return report(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
