"""A job from its folder lock to its objective: take the run folder, check the config before
any work, train (in this process, in spawned ranks, or as one torchrun rank), write
``summary.json`` and turn the outcome into the sweeper's value or an exit code.

A single run ends with a non-zero exit on failure: 2 for a user's mistake (one ``error:``
line), 1 for a failed run, 128 + signal when interrupted. In a ``-m`` sweep a failed job
returns NaN (its ``summary.json`` says ``failed``) so the other jobs go on; the sweep callback
in :mod:`mnistlab.sweeps.sweep` then writes ``sweep_summary.csv`` and exits non-zero.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import traceback
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from mnistlab.app import summary as summary_file
from mnistlab.app.checks import check
from mnistlab.config import hydra_error_line
from mnistlab.core import signals
from mnistlab.core.errors import USER_ERROR_EXIT, UserError, report, user_message
from mnistlab.processes import distributed, lock
from mnistlab.processes.threads import use_threads

log = logging.getLogger("mnistlab")
# A process's clock starts when this module is imported: a single run's start-up includes
# Hydra's compose, a spawned rank's its own imports. Each job of a sweep (many in one process)
# starts its own clock when it begins.
IMPORTED_AT = time.perf_counter()


def run(cfg: DictConfig, hc: Any, started: float) -> float:
    """One Hydra job: take the run folder, validate, train, write ``summary.json``; return
    the sweep objective."""
    try:
        next(lifecycle(cfg, hc, started))
    except StopIteration as end:  # a job that trains itself never pauses
        return end.value
    raise AssertionError("unreachable: only a stacked job pauses")


@dataclass
class Ready:
    """A stacked job paused, set up and ready to train: its launcher trains it with the
    others of its group and sends back how the loop ended."""

    job: Any  # mnistlab.app.job.Job (imported lazily: torch)
    streams: Any  # mnistlab.engine.checkpoint.Streams: where its random streams start
    group: int = 1  # the jobs it trained with, itself included (set by the launcher)


Lifecycle = Generator["Ready | None", Any, float]


def lifecycle(cfg: DictConfig, hc: Any, started: float, stacked: bool = False) -> Lifecycle:
    """A job from start to end, as a generator. Run alone (``stacked=False``) it trains
    itself and never pauses. A stacked job (``hydra/launcher=stacked``) pauses when it is set
    up, if it gets that far (yields :class:`Ready` and is sent the loop's outcome), and always
    once its ``summary.json`` is written (yields None), so that every job of a group has
    written its summary before one of them ends the sweep (an interrupted job)."""
    out_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        with lock.hold(out_dir):  # one live run per folder (torchrun's other ranks: scratch)
            summary, code, launch = yield from _attempt(cfg, hc, out_dir, started, stacked)
    except UserError as e:  # the folder is in use, or a resume was refused: left as it was
        code = report(str(e))
        if stacked:
            yield None
        return _stop(code, multirun)
    if stacked:
        yield None
    return _outcome(summary, code, hc, launch, out_dir, cfg.objective.metric)


def _attempt(
    cfg: DictConfig, hc: Any, out_dir: Path, started: float, stacked: bool
) -> Generator[Ready | None, Any, tuple[dict[str, Any], int, distributed.Launch | None]]:
    """Validate and train; any failure becomes a failed summary with its one line (a bug's
    traceback is printed first). Returns the summary, the exit code if it failed, the launch."""
    launch: distributed.Launch | None = None
    done = _already_completed(cfg, hc, out_dir)
    if done is not None:  # a resumed sweep: this job finished before; nothing to run
        log.info("already completed: %s (skipped)", out_dir / "summary.json")
        return done, 0, None
    try:
        cfg, launch = _prepare(cfg, hc, out_dir)
        if stacked and launch.mode == "single":
            summary = yield from _stacked(cfg, out_dir, started)
        else:
            summary = _dispatch(launch, cfg, out_dir, started)
        code = 1
    except Exception as e:
        known = _known_failure(e)
        if known is not None and cfg.trainer.resume and isinstance(e, UserError):
            raise  # keep the folder being resumed as it was: nothing was run
        if known is None:  # a bug: its traceback, then the summary records it
            traceback.print_exc()
            log.error("job failed%s", "; the sweep goes on" if hc.mode == RunMode.MULTIRUN else "")
        line, code = known or (f"{type(e).__name__}: {e}", 1)
        summary = {"status": "failed", "error": line}
    if launch is None or launch.rank == 0:  # only rank 0 writes (torchrun: every rank is here)
        summary_file.write(out_dir, summary, cfg, hc, started)
    return summary, code, launch


def _stacked(
    cfg: DictConfig, out_dir: Path, started: float
) -> Generator[Ready, Any, dict[str, Any]]:
    """A stacked job's training: set up, pause until its group has trained, then the summary
    from what the loop did."""

    from mnistlab.app import job
    from mnistlab.engine.checkpoint import Streams

    use_threads(cfg.trainer.num_threads)
    run = job.setup(cfg, out_dir)
    summary, clock = job.begin(run, started)
    ready = Ready(run, Streams.now(run.loop.train.x.device))
    outcome = yield ready
    summary["stacked_jobs"] = ready.group
    return job.end(run, summary, clock, outcome)


def _already_completed(cfg: DictConfig, hc: Any, out_dir: Path) -> dict[str, Any] | None:
    """In a sweep run again with ``trainer.resume=true``: the summary of a job that already
    completed all the epochs asked for, or stopped early, else None."""
    if not cfg.trainer.resume or hc.mode != RunMode.MULTIRUN:
        return None
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    epochs = summary.get("counted", {}).get("epochs", 0)
    finished = epochs >= cfg.trainer.epochs or "stopped_early" in summary
    done = summary.get("status") == "completed" and finished
    return summary if done else None


def _known_failure(e: Exception) -> tuple[str, int] | None:
    """The one line and exit code of a failure that is no bug: the user's mistake, a file
    operation the environment refused, or a rank that failed (2 if that was a user error)."""
    if isinstance(e, distributed.WorkerError):
        return f"error: {e}", USER_ERROR_EXIT if e.user_error else 1
    message = user_message(e)
    return (f"error: {message}", USER_ERROR_EXIT) if message is not None else None


def _prepare(cfg: DictConfig, hc: Any, out_dir: Path) -> tuple[DictConfig, distributed.Launch]:
    """Every check that needs no data, before any work: values, then the processes. A
    resumed run's config is its checkpoint's, with what the command line may change."""
    try:
        OmegaConf.to_container(cfg, resolve=True)  # a resolver's error is the user's value
    except InterpolationResolutionError as e:
        raise UserError(hydra_error_line(e)) from None
    from mnistlab.app.resume import resume_config
    from mnistlab.engine.checkpoint import LAST

    if cfg.trainer.resume and hc.mode == RunMode.MULTIRUN and not (out_dir / LAST).exists():
        cfg = cfg.copy()  # a resumed sweep's job that never started: it starts now
        cfg.trainer.resume = False
    if cfg.trainer.resume:
        cfg = resume_config(out_dir / LAST, cfg, list(hc.overrides.task))
    check(cfg)
    return cfg, distributed.plan_launch(cfg)


def _dispatch(
    launch: distributed.Launch, cfg: DictConfig, out_dir: Path, started: float
) -> dict[str, Any]:
    """Train in this process, in spawned ranks, or as one torchrun rank; rank 0's summary."""
    wanted = cfg.trainer.num_threads
    if launch.mode == "torchrun":  # this process is one rank already: join, don't spawn
        return distributed.join(_rank_job, launch, cfg, out_dir, started, num_threads=wanted)
    if launch.mode == "spawn":  # start the ranks here; rank 0's summary comes back
        resolved = OmegaConf.to_container(cfg, resolve=True)
        return distributed.spawn(_spawned_rank, launch, resolved, out_dir, num_threads=wanted)[0]

    from mnistlab.app import job

    use_threads(cfg.trainer.num_threads)
    return job.run(cfg, out_dir, started=started)


def _spawned_rank(launch: distributed.Launch, cfg: Any, out_dir: Path) -> dict[str, Any]:
    """A spawned rank times its start-up from its own imports."""
    return _rank_job(launch, cfg, out_dir, IMPORTED_AT)


def _rank_job(
    launch: distributed.Launch, cfg: Any, out_dir: Path, started: float
) -> dict[str, Any]:
    """One rank of a multi-process run (spawned, or under torchrun) after it joined the group."""
    from mnistlab.app import job

    if not isinstance(cfg, DictConfig):  # spawned: the resolved config as plain containers
        cfg = OmegaConf.create(cfg)
    if launch.mode == "torchrun":
        _adopt_torchrun_shape(cfg, launch)
        out_dir = Path(distributed.broadcast_object(str(out_dir)))  # rank 0's folder for all
    summary = job.run(cfg, Path(out_dir), launch.rank, launch.world_size, started=started)
    return summary if launch.rank == 0 else {"status": summary["status"]}


def _adopt_torchrun_shape(cfg: DictConfig, launch: distributed.Launch) -> None:
    """torchrun decides the world: record it in the config the summary saves."""
    t = cfg.trainer
    asked = (t.devices, t.num_nodes)
    if asked not in ((1, 1), (launch.local_world_size, launch.num_nodes)) and launch.rank == 0:
        log.warning(
            "torchrun runs %d node(s) x %d process(es): using that instead of "
            "trainer.devices=%d trainer.num_nodes=%d",
            launch.num_nodes,
            launch.local_world_size,
            t.devices,
            t.num_nodes,
        )
    t.devices, t.num_nodes = launch.local_world_size, launch.num_nodes


def _outcome(
    summary: dict[str, Any],
    code: int,
    hc: Any,
    launch: distributed.Launch | None,
    out_dir: Path,
    metric: str,
) -> float:
    """The job's exit: the objective's value for the sweeper (``objective.metric``), or the
    error line and its exit code."""
    error, multirun = summary.get("error"), hc.mode == RunMode.MULTIRUN
    if summary["status"] == "interrupted":  # the user asked to stop: a sweep stops too
        print(error, file=sys.stderr, flush=True)
        signals.stop_sweep(summary["signal"], multirun=multirun)
        sys.exit(128 + summary["signal"])
    if summary["status"] != "completed":
        print(error or "error: run failed", file=sys.stderr, flush=True)
        torchrun = launch is not None and launch.mode == "torchrun"
        return _stop(code, multirun and not torchrun)  # torchrun's agent stops the other ranks
    value = summary.get("final", {}).get(metric, math.nan)
    if launch is None or launch.rank == 0:
        log.info("%s %.4f; summary in %s", metric, value, out_dir / "summary.json")
    return value


def _stop(code: int, multirun: bool) -> float:
    """A failed job: a single run exits with ``code``; a sweep's job returns NaN and the
    sweep goes on."""
    if not multirun:
        sys.exit(code)
    return math.nan
