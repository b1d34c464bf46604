"""A sweep as a whole: its summary at the end, and stopping it as one.

:class:`Sweep` is a Hydra callback (``conf/config.yaml``). When a ``-m`` sweep starts it
refuses launcher settings that cannot run and takes SIGTERM/SIGINT for the whole sweep: the
signal goes on to every job process the launcher started (each one checkpoints at its next
step boundary and writes its summary as ``interrupted``), any process still alive after
:data:`GRACE_S` seconds is killed, ``sweep_summary.csv`` is written and the sweep exits with
128 + signal. Jobs in this same process (Hydra's basic launcher) stop through their own
checkpointer and call :func:`stop` when they end. Re-running the sweep with
``trainer.resume=true`` then skips completed jobs, resumes interrupted ones and starts the
ones that never ran (``mnistlab.train``).

When the sweep ends, ``sweep_summary.csv`` is written and the sweep exits non-zero if a job
did not complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mnistlab.config import check_objective
from mnistlab.config.schema import uses
from mnistlab.core import signals
from mnistlab.core.errors import ConfigError, report

log = logging.getLogger("mnistlab")
GRACE_S = 10.0  # how long job processes get to checkpoint before they are killed


class Sweep(Callback):
    """The sweep's start (launcher check, stop handling) and end (``sweep_summary.csv``)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_objective(config.objective)
        _check_launcher(config.hydra.launcher)
        # unresolved: an override may hold ${hydra:job.num}, which only a job can resolve
        _check_sweeps(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
        signals.install_for_sweep(Stop(Path(config.hydra.sweep.dir), config.objective))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        signals.install_for_sweep(None)
        report_to_wandb(config)
        if write_summary(Path(config.hydra.sweep.dir), config.objective):
            sys.exit(1)


def report_to_wandb(config: DictConfig) -> None:
    """``logger.wandb.sweep_report``: the sweep's report pictures (``<sweep>/report/``), once,
    in a W&B run of their own. Not every job's: a run's report costs about as much as a default
    run trains (docs/wandb.md), the sweep's about a second, once. A failure costs one line."""
    w = config.logger.wandb
    if not (uses(config.logger, "wandb") and w.mode != "disabled" and w.sweep_report):
        return
    from mnistlab.logger import sinks
    from mnistlab.logger.wandb_run import group_name, sweep_of, swept_keys
    from mnistlab.results.folders import find_runs
    from mnistlab.results.reports import write_sweep_report

    sweep_dir = Path(config.hydra.sweep.dir).resolve()
    runs = find_runs([sweep_dir], warn=False)
    if not runs:
        return
    keys, started = sweep_of(sweep_dir / "multirun.yaml")
    group = group_name(keys or swept_keys(config), started, sweep_dir)
    try:
        pictures = [p for p in write_sweep_report(sweep_dir, runs) if p.suffix == ".png"]
        sinks.log_pictures(w, sweep_dir, pictures, group)
    except Exception as e:
        log.warning("the sweep's report did not reach W&B (%s: %s)", type(e).__name__, e)


def _check_launcher(launcher: Any) -> None:
    """Launcher settings that cannot run, as one line (the launcher's own error would be a
    traceback from inside joblib). Hydra turns a callback's exception into a warning and goes
    on, so this exits itself."""
    target = str(launcher.get("_target_", ""))
    if "joblib" in target and launcher.get("n_jobs") == 0:
        allowed = "an integer >= 1, or negative to count back from the cores (-1: one per core)"
        sys.exit(report(str(ConfigError("hydra.launcher.n_jobs", 0, allowed))))
    if "stacked" in target and launcher.get("max_group", 1) < 1:
        error = ConfigError("hydra.launcher.max_group", launcher.max_group, "an integer >= 1")
        sys.exit(report(str(error)))


def _check_objective(objective: Any) -> None:
    """The objective the sweep or search selects on, checked once before its first job: a
    test metric or an unknown name is one line (exit 2), not one failed job per job. What
    depends on other keys (a validation split, BatchNorm) each job checks itself."""
    try:
        check_objective(objective.metric, objective.direction)
    except ConfigError as e:
        sys.exit(report(str(e)))


def _check_sweeps(overrides: Any) -> None:
    """A swept key with no value (``range(0)``, ``choice()``) makes a sweep of no job, which
    would launch nothing and exit 0: one line instead (exit 2). Intervals are a search's
    (they have no list of values)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for o in OverridesParser.create().parse_overrides(overrides):
        if not o.is_sweep_override() or o.is_interval_sweep():
            continue
        if not list(o.sweep_iterator()):
            error = ConfigError(
                o.get_key_element(), o.get_value_string(), "a sweep of at least one value"
            )
            sys.exit(report(str(error)))


def write_summary(sweep_dir: Path, objective: Any) -> list[dict[str, Any]]:
    """``sweep_summary.csv``: one row per job folder, the overrides that differ and the
    objective's column (``objective.metric``); logs the best job. Returns the rows of the jobs
    that did not complete (logged)."""
    from mnistlab.core.files import atomic_write_bytes
    from mnistlab.results.folders import (
        COLUMNS,
        best,
        differing_overrides,
        find_runs,
        offline_sync_globs,
        parse_overrides,
        row_of,
        to_csv,
        with_objective,
    )

    runs = find_runs([sweep_dir])
    rows = [row_of(r) for r in runs]
    keys = differing_overrides(rows)
    for row in rows:
        row.update(parse_overrides(row["overrides"]))
    metric, direction = objective.metric, objective.direction
    columns = ["run", *keys, *with_objective(COLUMNS[1:], metric)]
    atomic_write_bytes(sweep_dir / "sweep_summary.csv", to_csv(rows, columns).encode())
    top = best(rows, metric, direction)
    if top is not None:
        log.info("best job by %s (%s): %s = %.4g [%s]", metric, direction, top["run"],
                 top[metric], top["overrides"])  # fmt: skip
    count, globs = offline_sync_globs(sweep_dir)
    if count:
        log.info("W&B: %d offline runs; upload: wandb sync %s", count, " ".join(globs))
    failed = [r for r in rows if r["status"] != "completed"]
    if failed:
        log.error(
            "%d of %d jobs did not complete (%s); see %s",
            len(failed),
            len(rows),
            "; ".join(f"[{r['overrides']}] {r['status']}" for r in failed),
            sweep_dir / "sweep_summary.csv",
        )
    return failed


class Stop(signals.SweepStop):
    """The sweep's SIGTERM/SIGINT handler in the process that runs the sweep."""

    def __init__(self, sweep_dir: Path, objective: Any) -> None:
        self.sweep_dir, self.objective = sweep_dir, objective

    def __call__(self, signum: int, frame: Any) -> None:
        stop(signum, self.sweep_dir, self.objective)


def stop(signum: int, sweep_dir: Path, objective: Any) -> None:
    """Stop the whole sweep: pass the signal on to the job processes, give them
    :data:`GRACE_S` seconds to checkpoint, kill what is left, write the summary, exit."""
    name = signal.Signals(signum).name
    children = _descendants(os.getpid())
    signals.send(children, signum)
    deadline = time.monotonic() + GRACE_S
    while _alive(children, heeding=signum) and time.monotonic() < deadline:
        time.sleep(0.1)
    signals.send(_alive(children), signal.SIGKILL)
    write_summary(sweep_dir, objective)
    resume = "run the same command again with trainer.resume=true (and the same hydra.sweep.dir)"
    print(f"sweep interrupted by {name}: {sweep_dir / 'sweep_summary.csv'}; to continue, {resume}",
          file=sys.stderr, flush=True)  # fmt: skip
    sys.stdout.flush()
    os._exit(128 + signum)  # from inside a launcher's wait: no cleanup of its own to run


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (from ``/proc``: each process's parent)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    out, frontier = [], [root]
    while frontier:
        kids = [pid for pid, parent in parents.items() if parent in frontier]
        out += kids
        frontier = kids
    return out


def _alive(pids: list[int], heeding: int | None = None) -> list[int]:
    """The processes of ``pids`` still running (a zombie has ended; it is reaped as such);
    with ``heeding``, only those that do not ignore that signal (helpers such as Python's
    resource tracker ignore SIGTERM: waiting for them would only burn the grace period)."""
    alive = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("State", "").strip().startswith("Z"):
            _reap(pid)
        elif heeding is None or not int(fields.get("SigIgn", "0"), 16) >> (heeding - 1) & 1:
            alive.append(pid)
    return alive


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):  # not our child: its parent reaps it
        os.waitpid(pid, os.WNOHANG)
