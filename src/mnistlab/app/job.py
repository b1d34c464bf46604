"""One job: what one process does for one run, from its config to its summary.

Three steps, a screen each: :func:`setup` builds the components, each from its own config
node (data → model → regularizer, optimizer → loop, with its callbacks and sinks);
:func:`train` runs the loop and turns how it ended (completed, diverged, interrupted) into
the summary (its parts are :mod:`mnistlab.app.summary`'s). Every rank of a
multi-process run runs the same job; only rank 0 writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from mnistlab.app import summary
from mnistlab.app.components import Job
from mnistlab.bn.monitor import Monitor
from mnistlab.config.schema import EVALUATED
from mnistlab.core.errors import ConfigError, Diverged, Interrupted
from mnistlab.engine import checkpoint, data, models, regularizers, schedules
from mnistlab.engine.best import Best
from mnistlab.engine.checkpoint import Checkpointer
from mnistlab.engine.data import Split
from mnistlab.engine.loop import Callback, Fit, Loop, LoopConfig
from mnistlab.engine.optim import build_optimizer
from mnistlab.engine.steps import Cadence, StepCounter, StepPlan
from mnistlab.logger import sinks
from mnistlab.processes import distributed
from mnistlab.processes.threads import POLICIES, ThreadGovernor, threads_for_model

log = logging.getLogger("mnistlab")


def select_device(accelerator: str) -> torch.device:
    if accelerator == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if accelerator == "cuda":
        raise ConfigError(
            "trainer.accelerator", "cuda", "no CUDA device is visible; use trainer.accelerator=cpu"
        )
    return torch.device("cpu")


def setup(cfg: DictConfig, out_dir: Path, rank: int = 0, world_size: int = 1) -> Job:
    """Build every component of the run from ``cfg``; restore them from the checkpoint when
    ``trainer.resume``. W&B starts only once the data, the plan and the callbacks are known
    to be good, so bad input leaves no W&B run behind."""
    t, b, w = cfg.trainer, cfg.bn_stats, cfg.logger.wandb
    device = select_device(t.accelerator)
    torch.manual_seed(t.seed)  # before the model is built: its initial weights
    config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    resumed = checkpoint.load_for_resume(out_dir / checkpoint.LAST, config) if t.resume else None
    ds, model = data_and_model(cfg, device)
    train, val, test = ds.train, ds.val, ds.test
    if t.num_threads in POLICIES and device.type == "cpu":  # auto: by the model's size too
        per_batch = models.TRAIN_FACTOR * models.forward_flops(model, train.x[:2])[1] * t.batch_size
        torch.set_num_threads(threads_for_model(torch.get_num_threads(), per_batch))
    plan = StepPlan.from_config(t, len(train), world_size, models.smallest_batch(cfg.model))
    if rank == 0:
        log.info("\n%s", plan.banner(t.num_nodes))
    reg = regularizers.build(model, cfg.regularizer)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    scheduler = schedules.build(cfg.scheduler, optimizer, plan.total_steps)  # None: constant
    counter, running = _restore(resumed, cfg, model, optimizer, scheduler, out_dir, rank)
    net = distributed.wrap(model, device, world_size, cfg.model.sync_bn)  # DDP: world > 1
    model = models.unwrap(net)

    has_bn = bool(models.bn_layers(model))
    steps = (t.log_every_n_steps, w.log_every_n_steps, b.every_n_steps)
    cadence = Cadence.of(plan.total_steps, *steps, has_bn=has_bn)
    extra = _callbacks(cfg.callbacks)
    every = t.checkpoint_every_n_steps
    agree = distributed.any_rank if world_size > 1 else int  # ranks stop at one step
    ckpt = Checkpointer(out_dir, model, optimizer, config, every, rank, extra, agree, scheduler)
    monitor = Monitor(
        model, train.x, batch_size=t.batch_size, cadence=cadence, probe_samples=b.probe_samples,
        seed=t.seed, precision=t.precision, rank=rank, world_size=world_size,
        train_samples=plan.samples_seen, thin=b.every_n_steps is None,
    )  # fmt: skip
    ids = resumed["extra"] if resumed is not None else None  # the W&B run, its name and group
    out = sinks.build(
        cfg.logger, out_dir, plan.as_dict(), cadence.wandb_row, progress=t.progress,
        config=config, rank=rank,
        done_steps=counter.optimizer_steps, resume_ids=ids, checkpoint=out_dir / checkpoint.LAST,
    )  # fmt: skip
    ckpt.extra.update(out.ids())  # the W&B run id: a resumed run continues the same W&B run
    # torch.compile(module), not the in-place Module.compile(): before torch 2.14 that leaves
    # dynamo no frame to capture for an nn.Sequential. The BN pass calls the plain model.
    trained = torch.compile(net) if t.compile else net
    loop_cfg = LoopConfig(
        t.seed, cadence, rank, t.eval_every_n_epochs, t.eval_batch_size, t.precision,
        t.grad_clip_norm, t.grad_clip_value,
    )  # fmt: skip
    best = _best(cfg, ckpt, resumed, agree)
    callbacks: list[Callback] = [monitor, ckpt, *extra]
    if t.num_threads == "adaptive" and device.type == "cpu":  # follow the machine's load
        most, at = torch.get_num_threads(), counter.optimizer_steps
        callbacks.append(ThreadGovernor(most, start_step=at))
    callbacks.append(best)  # last: it may end the run once the others saw the epoch end
    if best.state.stopped is not None:  # resuming a run that stopped early: it stays so
        plan = replace(plan, epochs=best.state.stopped["epoch"])
    loop = Loop(trained, optimizer, reg, plan, train, test, out, loop_cfg, callbacks, val,
                scheduler)  # fmt: skip
    return Job(cfg, out_dir, world_size, plan, model, loop, monitor, ckpt, out, counter, running,
               resumed, best)  # fmt: skip


def _best(
    cfg: DictConfig,
    ckpt: Checkpointer,
    resumed: dict[str, Any] | None,
    agree: Callable[[int], int],
) -> Best:
    """The objective's tracker (best.pt, early stopping), where the checkpoint left it."""
    o, es = cfg.objective, cfg.trainer.early_stopping
    saved = resumed["extra"].get("best") if resumed is not None else None
    maximize = o.direction == "maximize"
    key = EVALUATED.get(o.metric)  # None: only the end measures it
    return Best(ckpt, o.metric, key, maximize, es.patience, es.min_delta, saved, agree)


def _restore(
    resumed: dict[str, Any] | None,
    cfg: DictConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None,
    out_dir: Path,
    rank: int,
) -> tuple[StepCounter, dict[str, Any] | None]:
    """Model, optimizer and scheduler from the checkpoint; where training stands (a fresh
    start when there is none). ``metrics.jsonl`` loses the rows the resumed run logs again."""
    if resumed is None:
        return StepCounter(), None
    epochs = cfg.trainer.epochs
    schedules.check_resume(cfg.scheduler, resumed["config"]["trainer"]["epochs"], epochs)
    counter, running = checkpoint.restore(resumed, model, optimizer, scheduler)
    lr, saved_lr = cfg.optimizer.lr, resumed["config"]["optimizer"]["lr"]
    if lr != saved_lr:  # the way out after a divergence: a lower rate from here on
        if scheduler is not None:
            allowed = f"the run's own {saved_lr} with scheduler={cfg.scheduler.name}"
            raise ConfigError("optimizer.lr", lr, allowed)
        for group in optimizer.param_groups:
            group["lr"] = lr
    if counter.epochs > epochs:
        raise ConfigError("trainer.epochs", epochs, f"at least {counter.epochs} (epochs done)")
    if rank == 0:
        checkpoint.truncate(out_dir / "metrics.jsonl", resumed["metrics_bytes"])
        log.info("resuming from %s at optimizer step %d", out_dir / checkpoint.LAST,
                 counter.optimizer_steps)  # fmt: skip
    return counter, running


def data_and_model(cfg: DictConfig, device: torch.device) -> tuple[data.Data, nn.Module]:
    """The dataset, every split on ``device``, and the model for its images, both in the
    memory layout the device prefers: where a run starts, and what evaluating one rebuilds."""
    ds = data.load(cfg.dataset)
    model = models.build(cfg.model, ds.image_shape, ds.num_classes, cfg.regularizer.dropout)
    model = model.to(device)
    layout = models.memory_format(model, device)
    if layout == torch.channels_last:
        model = model.to(memory_format=layout)

    def place(s: Split) -> Split:
        return Split(s.x.to(device).contiguous(memory_format=layout), s.y.to(device))

    return replace(ds, **{k: place(s) for k, s in ds.splits().items()}), model


def _callbacks(nodes: DictConfig) -> list[Callback]:
    """The ``callbacks`` config node's extra loop callbacks, instantiated by Hydra."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    out = []
    for name, node in nodes.items():
        target = node.get("_target_") if isinstance(node, DictConfig) else node
        try:
            callback = instantiate(node)
        except InstantiationException as e:
            reason = str(e).strip().splitlines()[0].split(", set env var HYDRA_FULL_ERROR")[0]
            raise ConfigError(f"callbacks.{name}._target_", target, reason) from None
        if not isinstance(callback, Callback):
            raise ConfigError(
                f"callbacks.{name}._target_", target, "a mnistlab.engine.loop.Callback"
            )
        out.append(callback)
    return out


@dataclass
class Clock:
    """When a job began (``perf_counter``), and the samples it had seen when its loop began."""

    started: float
    samples: int


def train(job: Job, started: float) -> dict[str, Any]:
    """Run the loop from where the job stands; return the summary (rank 0's is written).

    ``started`` is when this job's clock began (``perf_counter``): start-up is measured
    from it."""
    opened, clock = begin(job, started)
    return end(job, opened, clock, fit(job))


def fit(job: Job) -> Fit | BaseException:
    """The loop from where the job stands, stopped by SIGTERM/SIGINT at a step boundary:
    what it did, or what ended it (for :func:`end` to tell apart)."""
    try:
        with job.ckpt.stop_on_signals():
            return job.loop.fit(job.counter, job.running)
    except BaseException as e:
        return e


def begin(job: Job, started: float) -> tuple[dict[str, Any], Clock]:
    """Just before the loop: the summary's opening, the random streams where the run left
    them (a fresh run: the step-0 checkpoint), the clock."""
    if job.resumed is not None:
        checkpoint.set_rng_state(job.resumed["rng"])  # last: building the model drew from it
    else:  # step 0: a diverged or killed run always has a checkpoint to go back to
        job.ckpt.save(StepCounter(), {"loss": 0.0, "correct": 0.0, "count": 0})
    return summary.opening(job, started), Clock(started, job.counter.samples_seen)


def end(
    job: Job, out: dict[str, Any], clock: Clock, outcome: Fit | BaseException
) -> dict[str, Any]:
    """How the loop ended (its :class:`Fit`, or what it raised) as the summary; the sinks
    close in every case. A bug's exception is raised again once they have."""
    try:
        if isinstance(outcome, BaseException):
            raise outcome
        summary.completed(job, outcome, out, clock.started, clock.samples)
    except Diverged as e:
        out.update(summary.diverged(job, e))
    except Interrupted as e:
        out.update(summary.interrupted(job, e))
    except BaseException as e:  # a bug, or a second Ctrl-C: the sinks still close, saying so
        out["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        out.setdefault("counted", job.counter.counted())  # diverged or interrupted: how far
        # the schedule as the loop left it, from the step this process began at
        out["threads"] = summary.threads(job, start=out.get("resumed_from_step", 0))
        if job.best.record() is not None:  # the objective's best evaluation, and its file
            out["best"] = job.best.record()
        out["timings"]["wall_s"] = time.perf_counter() - clock.started
        if job.cfg.report and out["status"] == "completed" and distributed.is_rank_zero():
            out["timings"]["report_s"] = _report(job.out_dir, out)
        out["timings"].update(job.sinks.finish(out))  # W&B's own costs
    return out


def _report(out_dir: Path, out: dict[str, Any]) -> float:
    """``report=true``: the run's pictures, before W&B closes (so it can log them). A report
    that fails costs one warning line, never the run. Returns its seconds."""
    t0 = time.perf_counter()
    try:
        from mnistlab.results.reports import write_report

        write_report(out_dir, out)
    except Exception as e:
        log.warning("report not written (%s: %s); the run is fine: python -m mnistlab.report %s",
                    type(e).__name__, e, out_dir)  # fmt: skip
    return time.perf_counter() - t0


def run(
    cfg: DictConfig, out_dir: Path, rank: int = 0, world_size: int = 1, *, started: float
) -> dict[str, Any]:
    """Everything one process does for one run: set the job up, train it, return the summary.
    ``started`` (``perf_counter``) is when the job's clock began."""
    return train(setup(cfg, out_dir, rank, world_size), started)
