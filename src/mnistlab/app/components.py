"""A job's components, built by :func:`mnistlab.app.job.setup`: what every later step of the
job (the loop, the summary, a stacked group's lanes) reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from mnistlab.bn.monitor import Monitor
from mnistlab.engine.best import Best
from mnistlab.engine.checkpoint import Checkpointer
from mnistlab.engine.loop import Loop
from mnistlab.engine.steps import StepCounter, StepPlan
from mnistlab.logger.sinks import Sinks


@dataclass
class Job:
    """A run's components, built and (when resuming) restored, ready to train."""

    cfg: DictConfig
    out_dir: Path
    world_size: int
    plan: StepPlan
    model: nn.Module  # the plain module: checkpoints, BN statistics, regularizers, names
    loop: Loop  # trains through ``loop.model``: the model, wrapped in DDP and/or compiled
    monitor: Monitor
    ckpt: Checkpointer
    sinks: Sinks
    counter: StepCounter  # where training starts: zero, or the checkpoint's
    running: dict[str, Any] | None  # the checkpoint's train sums since its last row
    resumed: dict[str, Any] | None  # the checkpoint resumed from
    best: Best  # the objective at each evaluation: best.pt, early stopping
