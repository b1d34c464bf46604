"""``python -m mnistlab.train``: the Hydra entry point that wires config, data, model, loop, sinks.

A single run ends with a non-zero exit on failure. In a ``-m`` sweep a failed job returns
normally (its ``summary.json`` says ``failed``) so the other jobs go on; the sweep callback
in :mod:`mnistlab.compare` then writes ``sweep_summary.csv`` and exits non-zero.
"""

from __future__ import annotations

import logging
import math
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

    from . import bnstats, data, models, regularizers
    from .loop import LoopConfig, _position, evaluate, fit
    from .sinks import ConsoleSink, JsonlSink, Sinks
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

    sinks = Sinks()
    if rank == 0:
        sinks = Sinks([ConsoleSink(plan.total_steps, t.progress), JsonlSink(out_dir / "metrics.jsonl")])
    loop_cfg = LoopConfig(
        seed=t.seed,
        rank=rank,
        log_every_n_steps=t.log_every_n_steps or max(1, plan.total_steps // 50),
        eval_every_n_epochs=t.eval_every_n_epochs,
        eval_batch_size=t.eval_batch_size,
        precision=t.precision,
    )
    b = cfg.bn_stats
    monitor = bnstats.Monitor(
        model, train.x, batch_size=t.batch_size, total_steps=plan.total_steps,
        every_n_steps=b.every_n_steps, probe_samples=b.probe_samples, seed=t.seed,
        precision=t.precision, rank=rank, world_size=world_size,
    )  # fmt: skip
    loop_cfg.hooks.append(monitor)

    summary: dict[str, Any] = {"status": "failed", "plan": plan.as_dict()}
    t_start = time.perf_counter()
    summary["timings"] = {"startup_s": t_start - START}
    try:
        counter = fit(model, optimizer, reg, plan, train, test, sinks, loop_cfg)
        train_s = time.perf_counter() - t_start
        bn_row, bn_part = monitor.finish(
            counter.micro_batches, counter.optimizer_steps, b.recalibrate,
            lambda: evaluate(model, test, t.eval_batch_size, t.precision)["acc"],
        )  # fmt: skip
        if bn_row:
            sinks.log(_position(counter, plan) | bn_row)
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
            **bn_part.pop("final", {}),
        }
        summary.update(bn_part)
        summary["timings"].update(
            train_s=train_s,
            eval_s=loop_cfg.timings.get("eval_s", 0.0),
            bn_stats_s=monitor.seconds,
            samples_per_s=counter.samples_seen / train_s if train_s > 0 else None,
        )
    finally:
        summary["timings"]["wall_s"] = time.perf_counter() - START
        sinks.finish(summary)
    return summary


def run(cfg: DictConfig) -> float:
    """One Hydra job: validate, train, write ``summary.json``; return the sweep objective."""
    from .sinks import atomic_write_json

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    summary: dict[str, Any] = {"status": "failed"}
    error: str | None = None
    code = 1
    try:
        validate(cfg)
        threads = resolve_threads(cfg.trainer.num_threads)
        import torch

        torch.set_num_threads(threads)
        summary = train_job(cfg, out_dir)
        error = summary.get("error")
    except (ConfigError, DataError) as e:
        error, code = f"error: {e}", 2
    except Exception as e:  # anything else: still leave a summary, then show the traceback
        summary["error"] = f"{type(e).__name__}: {e}"
        _finish(out_dir, summary, cfg, hc)
        raise
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


def _finish(out_dir: Path, summary: dict[str, Any], cfg: DictConfig, hc: Any) -> None:
    from .sinks import atomic_write_json

    summary["overrides"] = list(hc.overrides.task)
    summary["config"] = OmegaConf.to_container(cfg, resolve=True)
    atomic_write_json(out_dir / "summary.json", summary)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    main()
