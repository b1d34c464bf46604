"""Learning-rate schedules over a run's optimizer steps, from the ``scheduler`` config node.

A schedule is sized from the step plan's exact ``total_steps`` (what the loop counts under
gradient accumulation, several devices and ``drop_last``; not the textbook N·epochs/batch,
not micro-batches) and stepped once per optimizer step, right after the optimizer and the
regularizer: optimizer step ``s`` (from 1) trains at the schedule's value for index ``s - 1``.
``constant`` builds no scheduler at all, so the default run is the same bit for bit. Torch's
own schedulers where torch has one; ``LambdaLR`` for the warm-up cosine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LambdaLR,
    LRScheduler,
    OneCycleLR,
    StepLR,
)

from mnistlab.core.errors import ConfigError


@dataclass(frozen=True)
class WarmupCosine:
    """``LambdaLR``'s factor for step index ``i``: a linear ramp ``(i + 1) / (warmup + 1)``
    (no step trains at rate 0), then a cosine from 1 down to ``floor`` (min_lr / lr), which it
    reaches at index ``total``, just after the last step. A dataclass, not a closure, so its
    fields travel in the scheduler's ``state_dict`` (the checkpoint)."""

    warmup: int
    total: int
    floor: float

    def __call__(self, i: int) -> float:
        if i < self.warmup:
            return (i + 1) / (self.warmup + 1)
        progress = min(1.0, (i - self.warmup) / (self.total - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(cfg: Any, total_steps: int) -> int:
    """``scheduler.warmup_steps``, or ``warmup_fraction`` of the run rounded down; refused
    unless some steps are left after it."""
    steps = cfg.warmup_steps
    if steps is None:
        return int(cfg.warmup_fraction * total_steps)
    if steps >= total_steps:
        allowed = f"fewer than the run's {total_steps} optimizer steps (python -m mnistlab.plan)"
        raise ConfigError("scheduler.warmup_steps", steps, allowed)
    return int(steps)


def check(cfg: Any, total_steps: int) -> None:
    """The checks against the run's length :func:`build` makes, for plans without a model."""
    if cfg.name in ("onecycle", "warmup_cosine"):
        warmup_steps(cfg, total_steps)


def depends_on_total(cfg: Any) -> bool:
    """Whether the schedule's shape is cut to the run's length (all but ``constant`` and a
    ``step`` schedule with a fixed ``step_size``)."""
    return cfg.name not in ("constant", "step") or (cfg.name == "step" and cfg.step_size is None)


def check_resume(cfg: Any, epochs_before: int, epochs: int) -> None:
    """Refuse a resume that changes ``trainer.epochs`` under a schedule sized to the run:
    the restored schedule would keep the old length, so its end would not be the run's."""
    if epochs != epochs_before and depends_on_total(cfg):
        raise ConfigError(
            "trainer.epochs",
            epochs,
            f"{epochs_before}, as when the run started: scheduler={cfg.name} is sized to that "
            "run's optimizer steps (only scheduler=constant, or step with a fixed "
            "scheduler.step_size, can be extended on resume)",
        )


def build(cfg: Any, optimizer: Optimizer, total_steps: int) -> LRScheduler | None:
    """The ``scheduler`` node's schedule over ``total_steps`` optimizer steps, with the
    optimizer's rate (``optimizer.lr``) as its peak; None for ``constant``."""
    if cfg.name == "constant":
        return None
    if cfg.name == "step":
        size = cfg.step_size or max(1, total_steps // 3)
        return StepLR(optimizer, step_size=size, gamma=cfg.gamma)
    if cfg.name == "cosine":
        return CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=cfg.min_lr)
    warmup = warmup_steps(cfg, total_steps)
    lr = optimizer.param_groups[0]["lr"]
    if cfg.name == "onecycle":
        # torch's pct_start: the fraction as given, or the exact count as a fraction
        pct = cfg.warmup_fraction if cfg.warmup_steps is None else warmup / total_steps
        return OneCycleLR(
            optimizer,
            max_lr=lr,
            total_steps=total_steps,
            pct_start=pct,
            anneal_strategy="cos",
            cycle_momentum=False,  # optimizer.momentum means what it says
            div_factor=cfg.div_factor,
            final_div_factor=cfg.final_div_factor,
        )
    return LambdaLR(optimizer, WarmupCosine(warmup, total_steps, cfg.min_lr / lr))
