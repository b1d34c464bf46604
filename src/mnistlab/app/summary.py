"""``summary.json``: what a run did, built here and nowhere else.

A job's summary opens before its loop (:func:`opening`: status ``failed`` until it is known
otherwise, the plan, the start-up time), takes one part for how the loop ended
(:func:`completed`, :func:`diverged`, :func:`interrupted`) and is written by the app with the
command line, launcher and config (:func:`write`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from mnistlab.app.components import Job
from mnistlab.core.errors import Diverged, Interrupted, user_message
from mnistlab.core.files import atomic_write_json
from mnistlab.engine.loop import Fit, evaluate, position
from mnistlab.engine.steps import StepCounter, StepPlan
from mnistlab.processes import distributed
from mnistlab.processes.threads import POLICIES, ThreadGovernor

RESUME = "python -m mnistlab.train hydra.run.dir={} trainer.resume=true"


def opening(job: Job, started: float) -> dict[str, Any]:
    """The summary as the loop starts: ``failed`` until the end says otherwise."""
    out: dict[str, Any] = {"status": "failed", "plan": job.plan.as_dict()}
    out.update(world_size=job.world_size, backend=distributed.current_backend())
    if job.resumed is not None:
        out["resumed_from_step"] = job.counter.optimizer_steps
    # train_s times the loop alone (Fit's span); set-up is in startup_s
    out["timings"] = {"startup_s": time.perf_counter() - started}
    out["num_threads"] = torch.get_num_threads()
    out["threads"] = threads(job, start=job.counter.optimizer_steps)
    return out


def threads(job: Job, *, start: int) -> dict[str, Any]:
    """The threads training ran with: ``trainer.num_threads``'s policy and its schedule, each
    ``[step, threads]`` from that step on, the first at ``start``. One entry unless
    ``adaptive`` followed the load: a new count changes float32 sums, so the schedule says
    where two runs' numbers may part."""
    policy = job.cfg.trainer.num_threads
    governor = next((c for c in job.loop.callbacks if isinstance(c, ThreadGovernor)), None)
    if governor is not None:
        schedule = [list(change) for change in governor.schedule]
    else:
        schedule = [[start, torch.get_num_threads()]]
    return {"policy": policy if policy in POLICIES else "fixed", "schedule": schedule}


def interrupted(job: Job, e: Interrupted) -> dict[str, Any]:
    """Stopped by a signal at a step boundary, its checkpoint saved: how to continue."""
    resume = RESUME.format(job.out_dir)
    return {
        "status": "interrupted",
        "interrupted_at_step": e.step,
        "signal": e.signum,
        "error": f"{e}; checkpoint saved in {job.ckpt.path}; continue with: {resume}",
    }


def diverged(job: Job, e: Diverged) -> dict[str, Any]:
    """What diverged, and the way back: resume the last finite checkpoint at a lower rate."""
    step, lr = job.ckpt.last_saved_step, job.cfg.optimizer.lr
    advice = f"try a lower optimizer.lr (now {lr})"
    if step is not None:
        resume = RESUME.format(job.out_dir)
        advice += (
            f"; resume the last checkpoint (step {step}) with: {resume} optimizer.lr={lr / 10:g}"
        )
    return {
        "status": "diverged",
        "diverged_at_step": e.step,
        "last_checkpoint_step": step,
        "error": f"error: {e}; {advice}",
    }


def completed(
    job: Job, fit: Fit, summary: dict[str, Any], started: float, start_samples: int
) -> None:
    """A completed loop's part of ``summary``: final BN gaps and metrics, the accounting
    against the plan (on every rank), timings. Collectives inside: every rank calls it."""
    train_s = fit.timings["end_at"] - fit.timings["start_at"]
    t, counter, net = job.cfg.trainer, fit.counter, job.loop.model

    def test_metrics() -> dict[str, float]:
        return evaluate(net, job.loop.test, t.eval_batch_size, t.precision)

    bn_row, bn_part = job.monitor.finish(
        counter.micro_batches,
        counter.optimizer_steps,
        job.cfg.bn_stats.recalibrate,
        lambda: test_metrics()["acc"],
    )
    if bn_row:
        job.sinks.log(position(counter, job.plan) | bn_row, kind="bn")
    final_test = test_metrics()
    final_train = evaluate(net, job.loop.train, t.eval_batch_size, t.precision)
    val = job.loop.val
    final_val = evaluate(net, val, t.eval_batch_size, t.precision) if val is not None else {}
    summary.update(_accounting(job, counter, _run_plan(job, summary)))
    summary["final"] = {
        **{f"val/{k}": v for k, v in final_val.items()},
        "test/loss": final_test["loss"],
        "test/acc": final_test["acc"],
        # the whole training split in eval mode: not the rows' train/* (the running mean
        # in train mode) nor their train_slice/* (a test-sized slice)
        "train_eval/loss": final_train["loss"],
        "train_eval/acc": final_train["acc"],
        "train_test_gap": final_train["acc"] - final_test["acc"],
        **job.loop.regularizer.metrics(),
        **bn_part.pop("final", {}),
    }
    summary.update(bn_part)
    job.best.finish(counter, summary["final"])  # an objective only the end measures
    first = fit.timings.get("first_step_at")
    summary["timings"].update(
        train_s=train_s,
        eval_s=fit.timings["eval_s"],
        first_step_s=first - started if first is not None else None,
        first_step_unix=fit.timings.get("first_step_unix"),
        bn_stats_s=job.monitor.seconds,
        samples_per_s=(counter.samples_seen - start_samples) / train_s if train_s > 0 else None,
    )


def _run_plan(job: Job, summary: dict[str, Any]) -> StepPlan:
    """The plan the counts answer to: the job's, or, if early stopping ended it, the plan of
    the epochs it ran (then the summary's ``plan`` and ``stopped_early`` say so)."""
    stop = job.best.state.stopped
    if stop is None:
        return job.plan
    plan = replace(job.plan, epochs=stop["epoch"])
    summary["plan"] = plan.as_dict()
    summary["stopped_early"] = {**stop, "planned_epochs": job.cfg.trainer.epochs}
    return plan


def _accounting(job: Job, counter: StepCounter, plan: StepPlan) -> dict[str, Any]:
    """Counted against ``plan``, on this rank and (a collective) on every rank."""
    mismatches = counter.compare(plan)
    counted = counter.counted()
    out: dict[str, Any] = {
        "status": "completed" if not mismatches else "failed",
        "counted": counted,
        "accounting_matches_plan": not mismatches,
        "mismatches": {k: {"counted": c, "planned": p} for k, (c, p) in mismatches.items()},
    }
    if job.world_size > 1:  # every rank's counts and weights, seen on rank 0
        ranks = distributed.rank_report(job.model, counted, job.cfg.model.sync_bn)
        out["bn_running_stats_from"] = ranks["bn_running_stats_from"]
        out["distributed"] = ranks
        if any(c != counted for c in ranks["counted_per_rank"]):
            mismatches["counted_per_rank"] = (ranks["counted_per_rank"], counted)
            out["mismatches"]["counted_per_rank"] = ranks["counted_per_rank"]
            out.update(status="failed", accounting_matches_plan=False)
    if mismatches:
        out["error"] = f"counted steps differ from the plan: {mismatches}"
    return out


def write(out_dir: Path, summary: dict[str, Any], cfg: DictConfig, hc: Any, started: float) -> None:
    """``summary.json`` (rank 0): the job's summary, with what only the app knows (the
    command line's overrides, the launcher, the resolved config, the wall time)."""
    summary["overrides"] = list(hc.overrides.task)
    summary.setdefault("launcher", launcher_name(hc.launcher))
    summary.setdefault("timings", {}).setdefault("wall_s", time.perf_counter() - started)
    try:
        summary["config"] = OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError:  # the error being reported: keep the raw config
        summary["config"] = OmegaConf.to_container(cfg, resolve=False)
    try:
        atomic_write_json(out_dir / "summary.json", summary)
    except OSError as e:  # a full disk: say so, and still end as the run did
        message = user_message(e)
        if message is None:
            raise
        print(f"error: summary.json not written: {message}", file=sys.stderr, flush=True)


def launcher_name(launcher: Any) -> str:
    """The Hydra launcher that ran the job, by its class's name (``basic``, ``joblib``,
    ``local`` and ``slurm`` for submitit, ``stacked``): how the job was trained."""
    target = str(launcher.get("_target_", "")).rsplit(".", 1)[-1]
    return target.removesuffix("Launcher").lower() or "basic"
