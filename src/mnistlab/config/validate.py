"""The checks Hydra's types cannot express (ranges, finiteness, choices, combinations), each
raised as one :class:`~mnistlab.core.errors.ConfigError` naming the key, the value and what is
allowed. Pure config: what needs torch or W&B to check (the model's shape, credentials, the
thread count) is :mod:`mnistlab.app.checks`'s."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mnistlab.config.messages import schema_keys
from mnistlab.config.schema import (
    ACCELERATORS,
    DIRECTIONS,
    EVALUATED,
    L1_MODES,
    L2_MODES,
    LOGGERS,
    OBJECTIVES,
    OPTIMIZERS,
    PRECISIONS,
    PROGRESS,
    SCHEDULERS,
    WANDB_MODES,
)
from mnistlab.core.errors import ConfigError


def check_known_keys(cfg: Any) -> None:
    """``+trainer.typo=1`` slips past Hydra's schema; refuse keys the schema doesn't know."""
    from omegaconf import DictConfig

    def walk(node: Any, path: str) -> None:
        allowed = schema_keys(path)
        if allowed is None or not isinstance(node, DictConfig):
            return
        for key in node:
            full = f"{path}.{key}" if path else str(key)
            if key not in allowed:
                where = path or "the config"
                raise ConfigError(full, node[key], f"no such key; {where} has {', '.join(allowed)}")
            walk(node[key], full)

    walk(cfg, "")


@dataclass(frozen=True)
class Num:
    """A numeric key's allowed values: finite, an integer if asked, between ``low`` and
    ``high`` (each end open or closed), and null where ``optional``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False

    def allows(self, v: Any) -> bool:
        if v is None:
            return self.optional
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if self.integer and int(v) != v:
            return False
        low_ok = self.low is None or (v > self.low if self.low_open else v >= self.low)
        return low_ok and (
            self.high is None or (v < self.high if self.high_open else v <= self.high)
        )

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{kind} in {left}{_num(self.low)}, {_num(self.high)}{right}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {_num(self.low)}"
        else:
            text = kind
        return text + (", or null" if self.optional else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


COUNT = Num(1, integer=True)  # epochs, batch sizes, devices, intervals: at least one
OPTIONAL_COUNT = Num(1, integer=True, optional=True)  # null: the default cadence or no limit
FRACTION = Num(0, 1, high_open=True)  # probabilities and momenta that must stay below 1

# Every numeric key and its range: checked before any work, by ``plan`` and ``train`` alike.
# ``[]`` checks each element of a list.
NUMBERS: dict[str, Num] = {
    "trainer.epochs": COUNT,
    "trainer.batch_size": COUNT,
    "trainer.devices": COUNT,
    "trainer.num_nodes": COUNT,
    "trainer.grad_accum": COUNT,
    "trainer.seed": Num(0, 2**32 - 1, integer=True),  # numpy's seed range too
    "trainer.eval_every_n_epochs": COUNT,
    "trainer.eval_batch_size": COUNT,
    "trainer.log_every_n_steps": OPTIONAL_COUNT,
    "trainer.checkpoint_every_n_steps": OPTIONAL_COUNT,
    "trainer.grad_clip_norm": Num(0, low_open=True, optional=True),
    "trainer.grad_clip_value": Num(0, low_open=True, optional=True),
    "trainer.early_stopping.patience": OPTIONAL_COUNT,
    "trainer.early_stopping.min_delta": Num(0),
    "model.hidden[]": COUNT,
    "model.channels[]": COUNT,
    "model.bn_momentum": Num(0, 1, low_open=True, optional=True),
    "regularizer.l1": Num(0),
    "regularizer.l2": Num(0),
    "regularizer.dropout": FRACTION,
    "optimizer.lr": Num(0, low_open=True),
    "optimizer.momentum": FRACTION,
    "optimizer.betas[]": FRACTION,
    "dataset.limit_train": OPTIONAL_COUNT,
    "dataset.limit_test": OPTIONAL_COUNT,
    "bn_stats.every_n_steps": OPTIONAL_COUNT,
    "bn_stats.probe_samples": OPTIONAL_COUNT,
    "logger.wandb.log_every_n_steps": OPTIONAL_COUNT,
    "scheduler.warmup_steps": Num(0, integer=True, optional=True),
    "scheduler.warmup_fraction": FRACTION,
    "scheduler.step_size": OPTIONAL_COUNT,
    "scheduler.gamma": Num(0, 1, low_open=True),
    "scheduler.min_lr": Num(0),
    "scheduler.div_factor": Num(1),
    "scheduler.final_div_factor": Num(1),
}

CHOICES: dict[str, tuple[str, ...]] = {
    "trainer.accelerator": ACCELERATORS,
    "trainer.precision": PRECISIONS,
    "trainer.progress": PROGRESS,
    "regularizer.l1_mode": L1_MODES,
    "regularizer.l2_mode": L2_MODES,
    "optimizer.name": OPTIMIZERS,
    "logger.name": LOGGERS,
    "logger.wandb.mode": WANDB_MODES,
    "objective.direction": DIRECTIONS,
    "scheduler.name": SCHEDULERS,
}


def check_number(key: str, value: Any, rule: Num) -> None:
    """One key's value against its rule: a ConfigError line naming what is allowed."""
    if not rule.allows(value):
        raise ConfigError(key, value, rule.describe())


def check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, value, "one of " + ", ".join(allowed))


def _values(cfg: Any, key: str) -> list[tuple[str, Any]]:
    """``(name, value)`` of a key, or of each element of a ``[]`` list key."""
    from omegaconf import OmegaConf

    if not key.endswith("[]"):
        return [(key, OmegaConf.select(cfg, key))]
    items = OmegaConf.select(cfg, key[:-2]) or []
    return [(f"{key[:-2]}[{i}]", v) for i, v in enumerate(items)]


def _check_val_size(value: Any) -> None:
    """The ranges of ``dataset.val_size``; whether the data can be split so is the data's
    check (``data.val_count``), which knows the training split's size and classes."""
    allowed = "a count (an integer >= 1), a fraction in (0, 1), or 0/null for no split"
    if isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
        raise ConfigError("dataset.val_size", value, allowed)
    bad = value is not None and (not math.isfinite(value) or value < 0)
    if bad or (isinstance(value, float) and value >= 1):
        raise ConfigError("dataset.val_size", value, allowed)


def _check_scheduler(s: Any, lr: float) -> None:
    """What the NUMBERS table cannot say of a schedule; checks against the run's length are
    the builder's (``schedules.check``)."""
    if not s.min_lr <= lr:  # its range is in NUMBERS; the bound is the optimizer's rate
        raise ConfigError("scheduler.min_lr", s.min_lr, f"a number in [0, optimizer.lr={lr}]")


RUNNING = {"train/acc": "train_eval/acc", "train/loss": "train_eval/loss"}


def check_objective(metric: Any, direction: Any) -> None:
    """The objective by itself: a metric the final summary can hold (never a test metric)
    and the direction its kind implies. A sweep or search checks this once, before its first
    job (:mod:`mnistlab.sweeps.sweep`); every job checks it again with :func:`validate`."""
    names = ", ".join(OBJECTIVES)
    if "test" in str(metric):
        allowed = f"not a test metric (the test set is reported, never optimised): one of {names}"
        raise ConfigError("objective.metric", metric, allowed)
    if metric in RUNNING:  # logged in rows only; the summary's is the evaluation in eval mode
        allowed = (
            f"{RUNNING[metric]} ({metric} is the running mean of training in train mode, in "
            f"rows only; {RUNNING[metric]} the whole training split in eval mode): one of {names}"
        )
        raise ConfigError("objective.metric", metric, allowed)
    check_choice("objective.metric", metric, OBJECTIVES)
    check_choice("objective.direction", direction, DIRECTIONS)
    # a sweep that maximises a loss picks the worst job without a word: refuse it
    implied = {"loss": "minimize", "acc": "maximize"}.get(metric.rpartition("/")[2])
    if implied is not None and direction != implied:
        allowed = f"{implied} for objective.metric={metric}"
        raise ConfigError("objective.direction", direction, allowed)


def _check_objective(cfg: Any) -> None:
    """A metric the final summary holds for this config, and never a test metric."""
    metric = cfg.objective.metric
    check_objective(metric, cfg.objective.direction)
    if metric.startswith("val/") and not cfg.dataset.val_size:
        raise ConfigError(
            "objective.metric",
            metric,
            f"a metric the run has: dataset.val_size={cfg.dataset.val_size} turns the "
            "validation split off; set dataset.val_size (e.g. 0.1) or "
            "objective.metric=train_eval/acc",
        )
    if metric.startswith("bn/") and not cfg.model.bn:
        allowed = "a metric the run has: model.bn=false has no BatchNorm statistics"
        raise ConfigError("objective.metric", metric, allowed)


def _check_early_stopping(cfg: Any) -> None:
    """Early stopping decides at evaluations: its objective must be one they measure."""
    patience, metric = cfg.trainer.early_stopping.patience, cfg.objective.metric
    if patience is not None and metric not in EVALUATED:
        allowed = (
            f"null with objective.metric={metric}, which only the end measures; early "
            f"stopping needs one each evaluation measures: {', '.join(EVALUATED)}"
        )
        raise ConfigError("trainer.early_stopping.patience", patience, allowed)


def validate(cfg: Any) -> None:
    """Check every value Hydra's types can't (ranges, finiteness, choices, combinations);
    raise the first problem as one ConfigError line."""
    for key, rule in NUMBERS.items():
        for name, value in _values(cfg, key):
            check_number(name, value, rule)
    for key, allowed in CHOICES.items():
        for name, value in _values(cfg, key):
            check_choice(name, value, allowed)
    _check_optimizer(cfg.optimizer)
    _check_strengths(cfg.regularizer, cfg.optimizer)
    _check_scheduler(cfg.scheduler, cfg.optimizer.lr)
    _check_val_size(cfg.dataset.val_size)
    _check_objective(cfg)
    _check_early_stopping(cfg)
    _check_wandb_project(cfg.logger.wandb.project)
    _check_wandb_labels(cfg.logger.wandb)
    check_known_keys(cfg)


def _check_optimizer(o: Any) -> None:
    """Combinations torch refuses only when the optimizer is built, or silently misreads."""
    if len(o.betas) != 2:
        raise ConfigError("optimizer.betas", list(o.betas), "exactly two numbers, [beta1, beta2]")
    if o.name == "sgd" and o.nesterov and o.momentum <= 0:
        allowed = "true only with optimizer.momentum > 0 (Nesterov momentum needs momentum)"
        raise ConfigError("optimizer.nesterov", True, allowed)


def _check_strengths(r: Any, o: Any) -> None:
    """A strength whose first step scales every weight by ``1 - lr * l2`` <= 0 (L2) or moves it
    by ``lr * l1`` >= 1 toward 0 (L1: more than any initial weight of a default-initialized
    layer, ``1/sqrt(fan_in)``) wipes the model out at once. Refused where the step is that
    (decoupled L2, proximal L1, or a penalty's gradient under plain SGD; Adam rescales it)."""
    sgd, bound = o.name == "sgd", f"< 1/optimizer.lr = {1 / o.lr:g}"
    if r.l2 > 0 and o.lr * r.l2 >= 1 and (r.l2_mode == "decoupled" or sgd):
        why = f"{bound} ({r.l2_mode}: each step scales every weight by 1 - optimizer.lr * l2)"
        raise ConfigError("regularizer.l2", r.l2, why)
    if r.l1 > 0 and o.lr * r.l1 >= 1 and (r.l1_mode == "proximal" or sgd):
        why = f"{bound} ({r.l1_mode}: each step moves every weight by optimizer.lr * l1 toward 0)"
        raise ConfigError("regularizer.l1", r.l1, why)


# W&B's own limits on a run's labels, which it enforces only once the run is created or synced
WANDB_LABELS = {"name": 128, "group": 128, "job_type": 64}
WANDB_TAG_CHARS = 64


def _check_wandb_labels(w: Any) -> None:
    """Names W&B would refuse (or truncate) after training, refused before it."""
    for key, most in WANDB_LABELS.items():
        value = w[key]
        if value is not None and not 0 < len(str(value)) <= most:
            raise ConfigError(f"logger.wandb.{key}", value, f"1-{most} characters, or null")
    for i, tag in enumerate(w.tags):
        if not 0 < len(str(tag)) <= WANDB_TAG_CHARS:
            raise ConfigError(f"logger.wandb.tags[{i}]", tag, f"1-{WANDB_TAG_CHARS} characters")


def _check_wandb_project(project: Any) -> None:
    """A project name W&B would refuse only after training started."""
    if not project or len(project) > 128 or any(c in project for c in "/\\#?%:"):
        raise ConfigError("logger.wandb.project", project, "1-128 characters, none of / \\ # ? % :")
