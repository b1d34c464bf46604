"""Every check of a job's config that needs no data, in one pass before any work: the
config's own (:func:`mnistlab.config.validate`), then what needs more than the config to
say: the thread count, the step plan (the dataset's size against batch, world and schedule),
the model (built on the meta device: its shape against the dataset's images, its size against
the memory there is) and W&B credentials. ``plan``, ``eval`` and
``train`` all call :func:`check`, so each refuses exactly what the others refuse."""

from __future__ import annotations

import os
from typing import Any

import torch

from mnistlab.config import validate
from mnistlab.config.schema import uses
from mnistlab.core.errors import ConfigError
from mnistlab.engine import data, models, schedules
from mnistlab.engine.steps import StepPlan
from mnistlab.logger.sinks import wandb_credentials, wandb_mode
from mnistlab.processes.threads import resolve_threads

GB = 1024**3


def check(cfg: Any) -> StepPlan:
    """Raise the first problem of ``cfg`` as one :class:`ConfigError` line; return the step
    plan it asks for (before any process starts: 1500 ranks of 1 sample are refused here,
    not after they were spawned)."""
    validate(cfg)
    resolve_threads(cfg.trainer.num_threads)
    models.check(cfg.model)
    t = cfg.trainer
    world, smallest = t.devices * t.num_nodes, models.smallest_batch(cfg.model)
    plan = StepPlan.from_config(t, data.train_size(cfg.dataset), world, smallest)
    schedules.check(cfg.scheduler, plan.total_steps)
    _check_model_fits(cfg)
    _check_wandb(cfg.logger)
    return plan


def _check_model_fits(cfg: Any) -> None:
    """The model built on the meta device (no memory, no random draws) for a named dataset's
    images: its forward on that shape, and its weights, gradients and optimizer state against
    the memory of the device it will train on. Your own data's shape is known only once it is
    read: its model is checked then (:func:`mnistlab.engine.models.build`)."""
    if getattr(cfg.dataset, "_target_", None) or cfg.dataset.name not in data.SHAPES:
        return
    shape, classes = data.SHAPES[cfg.dataset.name]
    with torch.device("meta"):
        net = models.build(cfg.model, shape, classes, cfg.regularizer.dropout)
    count = sum(p.numel() for p in net.parameters())
    copies = 4 if cfg.optimizer.name in ("adam", "adamw") else 3  # weights, grads, moment(s)
    need, free = count * 4 * copies, _free_memory(cfg.trainer.accelerator)
    if free is None or need <= free:
        return
    m = cfg.model
    if getattr(m, "_target_", None):
        key, value = "model._target_", m._target_
    elif max(m.hidden, default=0) >= max(m.channels, default=0):
        key, value = "model.hidden", list(m.hidden)
    else:
        key, value = "model.channels", list(m.channels)
    allowed = f"a model that fits: {count:,} parameters need about {need / GB:.1f} GB "
    allowed += f"(float32 weights, gradients, optimizer state), {free / GB:.1f} GB are free"
    raise ConfigError(key, value, allowed)


def _free_memory(accelerator: str) -> int | None:
    """Bytes free where training will run: the CUDA device's, else the machine's
    (``MemAvailable``); None where it cannot be known."""
    if accelerator != "cpu" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _check_wandb(logger: Any) -> None:
    """``online`` (asked for, or what ``auto`` makes of ``WANDB_MODE``) needs credentials:
    W&B's own lookup, nothing sent."""
    if not uses(logger, "wandb") or wandb_mode(logger.wandb.mode) != "online":
        return
    if not wandb_credentials():
        via = (
            "" if logger.wandb.mode == "online" else f" (WANDB_MODE={os.environ.get('WANDB_MODE')})"
        )
        raise ConfigError(
            "logger.wandb.mode",
            f"{logger.wandb.mode}{via}",
            "no W&B credentials here (WANDB_API_KEY, or ~/.netrc from `wandb login`); run "
            "`wandb login`, or use logger.wandb.mode=offline (or auto with WANDB_MODE unset: "
            "offline without credentials)",
        )
