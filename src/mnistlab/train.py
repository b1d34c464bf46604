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

from .config import ConfigError, register, resolve_threads, validate
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
            "trainer.accelerator", "cuda", "no CUDA device is visible here; use trainer.accelerator=cpu"
        )
    return torch.device("cpu")


def _optimizer(cfg: DictConfig, params: Any) -> Any:
    import torch

    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas))
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=0.0)


def train_job(cfg: DictConfig, out_dir: Path, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Everything one process does for one run; returns the summary (rank 0's is written)."""
    import torch

    from . import data, models, regularizers
    from . import sinks as sinks_
    from .loop import LoopConfig, evaluate, fit
    from .steps import StepPlan

    t, m, r = cfg.trainer, cfg.model, cfg.regularizer
    device = _select_device(t.accelerator)
    torch.manual_seed(t.seed)

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
    reg = regularizers.build(model, r.l1, r.l2, r.l1_mode, r.l2_mode, r.exclude_bn_and_bias)
    optimizer = _optimizer(cfg, model.parameters())

    sinks = sinks_.build(cfg, out_dir, plan, rank)  # W&B starts here: after data and checks
    loop_cfg = LoopConfig(
        seed=t.seed,
        rank=rank,
        log_every_n_steps=t.log_every_n_steps or max(1, plan.total_steps // 50),
        eval_every_n_epochs=t.eval_every_n_epochs,
        eval_batch_size=t.eval_batch_size,
        precision=t.precision,
    )

    summary: dict[str, Any] = {"status": "failed", "plan": plan.as_dict()}
    t_start = time.perf_counter()
    summary["timings"] = {"startup_s": t_start - START}
    try:
        counter = fit(model, optimizer, reg, plan, train, test, sinks, loop_cfg)
        train_s = time.perf_counter() - t_start
        final_test = evaluate(model, test, t.eval_batch_size, t.precision)
        final_train = evaluate(model, train, t.eval_batch_size, t.precision)
        mismatches = counter.compare(plan)
        summary.update(
            status="completed" if not mismatches else "failed",
            counted={
                "total_micro_batches": counter.micro_batches,
                "total_steps": counter.optimizer_steps,
                "samples_seen": counter.samples_seen,
                "epochs": counter.epochs,
            },
            accounting_matches_plan=not mismatches,
            mismatches={k: {"counted": c, "planned": p} for k, (c, p) in mismatches.items()},
        )
        if mismatches:
            summary["error"] = f"counted steps differ from the plan: {mismatches}"
        summary["final"] = {
            "test/loss": final_test["loss"],
            "test/acc": final_test["acc"],
            "train/loss": final_train["loss"],
            "train/acc": final_train["acc"],
            "train_test_gap": final_train["acc"] - final_test["acc"],
            **reg.metrics(),
        }
        summary["timings"].update(
            train_s=train_s,
            eval_s=loop_cfg.timings.get("eval_s", 0.0),
            samples_per_s=counter.samples_seen / train_s if train_s > 0 else None,
        )
    finally:
        summary["timings"]["wall_s"] = time.perf_counter() - START
        sinks.finish(summary)
    return summary


def run(cfg: DictConfig) -> float:
    """One Hydra job: validate, train, write ``summary.json``; return the sweep objective."""
    from .sinks import atomic_write_json

    global START, _JOBS_RUN
    if _JOBS_RUN:
        START = time.perf_counter()
    _JOBS_RUN += 1
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    summary: dict[str, Any] = {"status": "failed"}
    error: str | None = None
    code = 1
    try:
        validate(cfg)
        threads = resolve_threads(cfg.trainer.num_threads, parallel_jobs=parallel_jobs(hc))
        import torch

        torch.set_num_threads(threads)
        summary = train_job(cfg, out_dir)
        summary["threads"] = threads
        error = summary.get("error")
    except (ConfigError, DataError) as e:
        error, code = f"error: {e}", 2
    except Exception as e:  # anything else: still leave a summary, then show the traceback
        summary["error"] = f"{type(e).__name__}: {e}"
        _finish(out_dir, summary, cfg, hc)
        if not multirun:
            raise
        log.exception("job failed; the sweep goes on")  # Hydra would stop the sweep here
        return math.nan
    if error:
        summary["error"] = error
    _finish(out_dir, summary, cfg, hc)
    if summary["status"] != "completed":
        log.error(error or "run failed")
        if not multirun:
            sys.exit(code)
        return math.nan
    acc = summary.get("final", {}).get("test/acc", math.nan)
    log.info("test accuracy %.4f; summary in %s", acc, out_dir / "summary.json")
    return acc


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


def _finish(out_dir: Path, summary: dict[str, Any], cfg: DictConfig, hc: Any) -> None:
    from .sinks import atomic_write_json

    summary["overrides"] = list(hc.overrides.task)
    summary.setdefault("timings", {}).setdefault("wall_s", time.perf_counter() - START)
    summary["config"] = OmegaConf.to_container(cfg, resolve=True)
    atomic_write_json(out_dir / "summary.json", summary)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    main()
