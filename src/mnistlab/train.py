"""``python -m mnistlab.train``: the Hydra entry point that wires config, data, model, loop, sinks.

A single run ends with a non-zero exit on failure. In a ``-m`` sweep a failed job returns
normally (its ``summary.json`` says ``failed``) so the other jobs go on; the sweep callback
in :mod:`mnistlab.compare` then writes ``sweep_summary.csv`` and exits non-zero.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from . import distributed
from .config import ConfigError, hydra_error_line, register, resolve_threads, validate
from .data import DataError

log = logging.getLogger("mnistlab")
START = time.perf_counter()
_JOBS_RUN = 0  # a sweep runs several jobs in one process; each after the first times from its start

register()


def _select_device(accelerator: str) -> Any:
    import torch

    if accelerator == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if accelerator == "cuda":
        raise ConfigError(
            "trainer.accelerator",
            "cuda",
            "no CUDA device is visible; use trainer.accelerator=cpu",
        )
    return torch.device("cpu")


def build_optimizer(cfg: DictConfig, params: Any) -> Any:
    """torch's optimizer; ``optimizer.fused`` picks its fused kernel (one op updates every
    tensor: on a small model the per-tensor updates cost more than the arithmetic)."""
    import torch

    o = cfg.optimizer
    impl = {"fused": True} if o.fused else {}  # false: torch's default implementation
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, **impl)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), **impl)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=0.0, **impl)


def train_job(cfg: DictConfig, out_dir: Path, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Everything one process does for one run; returns the summary (rank 0's is written)."""
    import torch

    from . import bnstats, checkpoint, data, models, regularizers
    from . import sinks as sinks_
    from .loop import Diverged, LoopConfig, evaluate, fit, position
    from .steps import StepCounter, StepPlan

    t, m, r = cfg.trainer, cfg.model, cfg.regularizer
    device = _select_device(t.accelerator)
    torch.manual_seed(t.seed)
    config = OmegaConf.to_container(cfg, resolve=True)
    ckpt_path = out_dir / checkpoint.LAST
    resumed = checkpoint.load_for_resume(ckpt_path, config) if t.resume else None  # type: ignore[arg-type]

    ds = data.load(
        cfg.dataset.name,
        cfg.dataset.root,
        cfg.dataset.download,
        cfg.dataset.limit_train,
        cfg.dataset.limit_test,
    )
    train = data.Split(ds.train.x.to(device), ds.train.y.to(device))
    test = data.Split(ds.test.x.to(device), ds.test.y.to(device))
    plan = StepPlan(len(train), t.epochs, t.batch_size, world_size, t.grad_accum, t.drop_last)
    if plan.micro_batches_per_epoch == 0:
        raise ConfigError(
            "trainer.batch_size",
            t.batch_size,
            f"at most {plan.samples_per_rank} (one rank's shard) with trainer.drop_last=true",
        )
    if rank == 0:
        log.info("\n%s", plan.banner(t.num_nodes))

    model = models.build(
        m.name, ds.image_shape, ds.num_classes, m.hidden, m.channels, m.bn, m.bn_momentum, r.dropout
    ).to(device)
    if m.name == "cnn" and device.type == "cuda":  # NHWC: cuDNN's fast layout for convolutions
        model = model.to(memory_format=torch.channels_last)
        nhwc = torch.channels_last
        train = data.Split(train.x.contiguous(memory_format=nhwc), train.y)
        test = data.Split(test.x.contiguous(memory_format=nhwc), test.y)
    reg = regularizers.build(model, r.l1, r.l2, r.l1_mode, r.l2_mode, r.exclude_bn_and_bias)
    optimizer = build_optimizer(cfg, model.parameters())
    counter, running = StepCounter(), None
    metrics_path = out_dir / "metrics.jsonl"
    if resumed is not None:
        counter, running = checkpoint.restore(resumed, model, optimizer)
        if counter.epochs > t.epochs:
            raise ConfigError(
                "trainer.epochs", t.epochs, f"at least {counter.epochs} (epochs already done)"
            )
        if rank == 0:
            checkpoint.truncate(metrics_path, resumed["metrics_bytes"])
            log.info("resuming from %s at optimizer step %d", ckpt_path, counter.optimizer_steps)
    model = distributed.wrap(model, device, world_size, m.sync_bn)  # DDP when world_size > 1

    run_id = resumed["extra"].get("wandb_run_id") if resumed is not None else None
    # W&B starts here: after validation, data and the plan check, so bad input leaves no run
    sinks = sinks_.build(cfg, out_dir, plan, rank, counter.optimizer_steps, run_id)
    ckpt = checkpoint.Checkpointer(
        ckpt_path,
        distributed.unwrap(model),
        optimizer,
        config,  # type: ignore[arg-type]
        t.checkpoint_every_n_steps,
        metrics_path if rank == 0 else None,
        write=rank == 0,
    )
    ckpt.extra.update(sinks.ids())  # the W&B run id: a resumed run continues the same W&B run
    log_every = sinks_.row_every(t.log_every_n_steps, plan.total_steps)

    def weight_metrics(step: int) -> dict[str, Any] | None:
        """Norms, sparsity and the penalty's value, on the loop's logging cadence."""
        return reg.metrics() if step % log_every == 0 or step == plan.total_steps else None

    loop_cfg = LoopConfig(
        seed=t.seed,
        rank=rank,
        log_every_n_steps=log_every,
        hooks=[weight_metrics],
        eval_every_n_epochs=t.eval_every_n_epochs,
        eval_batch_size=t.eval_batch_size,
        precision=t.precision,
        boundary_hooks=[ckpt],
        kill_at_micro_batch=int(os.environ.get("MNISTLAB_TEST_KILL_AT_MICRO_BATCH", 0)) or None,
    )
    fault = distributed.fault_hook(rank)  # test hook, see distributed.py
    if fault is not None:
        loop_cfg.hooks.append(fault)
    loop_cfg.hooks.append(_first_step_clock(loop_cfg.timings))
    # The loop trains through `net`; `model` keeps its module names for checkpoints, BN
    # statistics and the regularizers, and the BN pass calls it eagerly (hooks, no tracing).
    # torch.compile(module), not the in-place Module.compile(): before torch 2.14 the latter
    # leaves dynamo no frame to capture for a model whose forward is torch's own (Sequential).
    net = torch.compile(model) if t.compile else model
    b = cfg.bn_stats
    monitor = bnstats.Monitor(
        model, train.x, batch_size=t.batch_size, total_steps=plan.total_steps,
        every_n_steps=b.every_n_steps, probe_samples=b.probe_samples, seed=t.seed,
        precision=t.precision, rank=rank, world_size=world_size, train_samples=plan.samples_seen,
    )  # fmt: skip
    loop_cfg.hooks.append(monitor)

    summary: dict[str, Any] = {"status": "failed", "plan": plan.as_dict()}
    summary.update(world_size=world_size, backend=distributed.current_backend())
    if resumed is not None:
        summary["resumed_from_step"] = counter.optimizer_steps
    start_samples = counter.samples_seen
    if resumed is not None:
        checkpoint.set_rng_state(resumed["rng"])
    else:  # step 0: a diverged or killed run always has a checkpoint to go back to
        ckpt.save(StepCounter(), {"loss": 0.0, "correct": 0.0, "count": 0})
    t_start = time.perf_counter()  # train_s times the loop alone; set-up is in startup_s
    summary["timings"] = {"startup_s": t_start - START}
    summary["num_threads"] = torch.get_num_threads()
    try:
        with ckpt.stop_on_signals():
            counter = fit(net, optimizer, reg, plan, train, test, sinks, loop_cfg, counter, running)
        train_s = time.perf_counter() - t_start
        bn_row, bn_part = monitor.finish(
            counter.micro_batches, counter.optimizer_steps, b.recalibrate,
            lambda: evaluate(net, test, t.eval_batch_size, t.precision)["acc"],
        )  # fmt: skip
        if bn_row:
            sinks.log(position(counter, plan) | bn_row)
        final_test = evaluate(net, test, t.eval_batch_size, t.precision)
        final_train = evaluate(net, train, t.eval_batch_size, t.precision)
        mismatches = counter.compare(plan)
        summary.update(
            status="completed" if not mismatches else "failed",
            counted=counter.counted(),
            accounting_matches_plan=not mismatches,
            mismatches={k: {"counted": c, "planned": p} for k, (c, p) in mismatches.items()},
        )
        if world_size > 1:  # a collective: every rank's counts and weights, seen on rank 0
            ranks = distributed.rank_report(model, summary["counted"], m.sync_bn)
            summary["bn_running_stats_from"] = ranks["bn_running_stats_from"]
            summary["distributed"] = ranks
            if any(c != summary["counted"] for c in ranks["counted_per_rank"]):
                mismatches["counted_per_rank"] = (ranks["counted_per_rank"], summary["counted"])
                summary["mismatches"]["counted_per_rank"] = ranks["counted_per_rank"]
                summary.update(status="failed", accounting_matches_plan=False)
        if mismatches:
            summary["error"] = f"counted steps differ from the plan: {mismatches}"
        summary["final"] = {
            "test/loss": final_test["loss"],
            "test/acc": final_test["acc"],
            "train/loss": final_train["loss"],
            "train/acc": final_train["acc"],
            "train_test_gap": final_train["acc"] - final_test["acc"],
            **reg.metrics(),
            **bn_part.pop("final", {}),
        }
        summary.update(bn_part)
        summary["timings"].update(
            train_s=train_s,
            eval_s=loop_cfg.timings.get("eval_s", 0.0),
            first_step_s=loop_cfg.timings.get("first_step_s"),
            first_step_unix=loop_cfg.timings.get("first_step_unix"),
            bn_stats_s=monitor.seconds,
            samples_per_s=(counter.samples_seen - start_samples) / train_s if train_s > 0 else None,
        )
    except Diverged as e:
        lr = cfg.optimizer.lr
        kept = f"last checkpoint (step {ckpt.last_saved_step}) kept in {ckpt_path}"
        summary.update(
            status="diverged",
            diverged_at_step=e.step,
            last_checkpoint_step=ckpt.last_saved_step,
            error=f"error: loss became {e.loss} at optimizer step {e.step}; try a lower "
            f"optimizer.lr (now {lr}){'; ' + kept if ckpt.last_saved_step is not None else ''}",
        )
    except checkpoint.Interrupted as e:
        summary.update(
            status="interrupted",
            interrupted_at_step=e.step,
            signal=e.signum,
            error=f"{e}; checkpoint saved in {ckpt_path}; continue with: python -m mnistlab.train "
            f"hydra.run.dir={out_dir} trainer.resume=true",
        )
    finally:
        summary.setdefault("counted", counter.counted())  # diverged or interrupted: how far
        summary["timings"]["wall_s"] = time.perf_counter() - START
        sinks.finish(summary)
    return summary


def _first_step_clock(timings: dict[str, float]) -> Any:
    """A step hook that notes when the first optimizer step ended (``scripts/bench.py`` reads
    ``first_step_unix`` to time a command from its start to its first step)."""

    def hook(step: int) -> None:
        if step == 1 and "first_step_s" not in timings:
            timings["first_step_s"] = time.perf_counter() - START
            timings["first_step_unix"] = time.time()

    return hook


def parallel_jobs(hc: Any) -> int:
    """Sweep jobs running at once on this machine: the joblib launcher's ``n_jobs`` (negative
    counts back from the core count, as in joblib), else 1. Threads per job divide by it."""
    n = hc.launcher.get("n_jobs") if "joblib" in str(hc.launcher.get("_target_", "")) else None
    if n is None or hc.mode != RunMode.MULTIRUN:
        return 1
    if n < 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        n = (cores or 1) + 1 + n
    return max(1, int(n))


def run(cfg: DictConfig) -> float:
    """One Hydra job: validate, train, write ``summary.json``; return the sweep objective."""
    global START, _JOBS_RUN
    if _JOBS_RUN:  # a sweep's later jobs in this process: time each job from its own start
        START = time.perf_counter()
    _JOBS_RUN += 1
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    summary: dict[str, Any] = {"status": "failed"}
    error: str | None = None
    code = 1
    launch = None
    global _IN_TASK
    _IN_TASK = True
    try:
        validate(cfg)
        launch = distributed.plan_launch(cfg)
        if launch.mode == "torchrun":  # this process is one rank already: join, don't spawn
            summary = distributed.join(
                _rank_job, launch, cfg, out_dir, num_threads=cfg.trainer.num_threads
            )
        elif launch.mode == "spawn":  # start the ranks here; rank 0's summary comes back
            resolved = OmegaConf.to_container(cfg, resolve=True)
            summary = distributed.spawn(
                "mnistlab.train:_rank_job",
                launch,
                resolved,
                out_dir,
                num_threads=cfg.trainer.num_threads,
            )[0]
        else:
            threads = resolve_threads(cfg.trainer.num_threads, 1, parallel_jobs(hc))
            import torch

            torch.set_num_threads(threads)
            summary = train_job(cfg, out_dir)
        error = summary.get("error")
    except (ConfigError, DataError) as e:
        error, code = f"error: {e}", 2
        if cfg.trainer.resume:  # keep the folder being resumed as it was: nothing was run
            _IN_TASK = False
            print(error, file=sys.stderr, flush=True)
            if not multirun:
                sys.exit(code)
            return math.nan
    except distributed.WorkerError as e:  # one line: which rank, which error
        error, code = f"error: {e}", 2 if e.user_error else 1
    except InterpolationResolutionError as e:  # a bad value met while resolving the config
        error, code = f"error: {hydra_error_line(e)}", 2
    except Exception as e:  # anything else: still leave a summary, then show the traceback
        summary["error"] = f"{type(e).__name__}: {e}"
        if launch is None or launch.rank == 0:
            _finish(out_dir, summary, cfg, hc)
        if not multirun:
            raise  # _IN_TASK stays True: cli() lets this traceback through
        _IN_TASK = False
        log.exception("job failed; the sweep goes on")  # Hydra would stop the sweep here
        return math.nan
    _IN_TASK = False
    if error:
        summary["error"] = error
    rank = launch.rank if launch is not None else 0
    if rank == 0:  # only rank 0 writes (under torchrun every rank runs this function)
        _finish(out_dir, summary, cfg, hc)
    if summary["status"] == "interrupted":  # stop a sweep too: the user asked to stop
        print(error, file=sys.stderr, flush=True)
        sys.exit(128 + summary["signal"])
    if summary["status"] != "completed":
        print(error or "error: run failed", file=sys.stderr, flush=True)
        if not multirun or (launch is not None and launch.mode == "torchrun"):
            sys.exit(code)  # under torchrun, exiting lets the agent stop the other ranks
        return math.nan
    acc = summary.get("final", {}).get("test/acc", math.nan)
    if rank != 0:
        return acc
    log.info("test accuracy %.4f; summary in %s", acc, out_dir / "summary.json")
    return acc


def _rank_job(launch: distributed.Launch, cfg: Any, out_dir: Path) -> dict[str, Any]:
    """One rank of a multi-process run (spawned, or under torchrun) after it joined the group."""
    if not isinstance(cfg, DictConfig):  # spawned: the resolved config as plain containers
        cfg = OmegaConf.create(cfg)
    if launch.mode == "torchrun":
        _adopt_torchrun_shape(cfg, launch)
        out_dir = Path(distributed.broadcast_object(str(out_dir)))  # rank 0's folder for all
    summary = train_job(cfg, Path(out_dir), launch.rank, launch.world_size)
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


def _finish(out_dir: Path, summary: dict[str, Any], cfg: DictConfig, hc: Any) -> None:
    from .sinks import atomic_write_json

    summary["overrides"] = list(hc.overrides.task)
    summary.setdefault("timings", {}).setdefault("wall_s", time.perf_counter() - START)
    try:
        summary["config"] = OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError:  # the error being reported: keep the raw config
        summary["config"] = OmegaConf.to_container(cfg, resolve=False)
    atomic_write_json(out_dir / "summary.json", summary)


@distributed.one_folder_under_torchrun
@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return run(cfg)


# True while a job runs: an OmegaConf error raised there is a bug (traceback), not a user's.
_IN_TASK = False


def cli() -> None:
    """``main`` with Hydra's compose errors (unknown key or choice, wrong type, bad override
    syntax) as one ``error:`` line and exit code 2 instead of Hydra's multi-line report.

    Hydra prints those itself inside ``run_and_report`` unless ``HYDRA_FULL_ERROR=1``, so we
    set it, catch what comes out and condense it; a user who set it gets the full trace."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    user_value = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException) as e:
        if user_value == "1" or _IN_TASK:
            raise
        print(f"error: {hydra_error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, without the last checkpoint
        print("interrupted twice: stopped at once; the last checkpoint is kept", file=sys.stderr)
        sys.exit(130)
    finally:
        if user_value is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = user_value


if __name__ == "__main__":
    cli()
