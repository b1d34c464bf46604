"""The config schema Hydra validates against, and the range checks it cannot express.

The dataclasses are registered in Hydra's ConfigStore as the base of ``conf/config.yaml``, so
a wrong type, an unknown key or an unknown group choice fails at compose time. What Hydra can't
say (``batch_size >= 1``, a momentum in (0, 1]) is checked by :func:`validate`, which raises one
:class:`~mnistlab.errors.ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .threads import resolve_threads


def _conf_dir() -> Path:
    """Where Hydra reads the config groups. A wheel carries the repository's top-level
    ``conf/`` inside the package (``mnistlab/conf``, copied by ``setup.py``); a source checkout,
    as the editable install and ``PYTHONPATH=src`` use it, has it two levels above this file.
    An absolute path, so every entry (``python -m``, the console scripts, tab completion) finds
    it from any folder."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return packaged if packaged.is_dir() else here.parents[1] / "conf"


CONF_DIR = _conf_dir()


@dataclass
class DatasetConfig:
    name: str = "digits"
    root: str = "data"
    download: bool = True
    limit_train: int | None = None
    limit_test: int | None = None
    # Carved from the training split (after limit_train): a count (int >= 1) or a fraction
    # (float in (0, 1)); 0 or null: no validation split. Any: OmegaConf has no int | float.
    val_size: Any = 0.1


@dataclass
class ModelConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    channels: list[int] = field(default_factory=lambda: [16, 32])
    bn: bool = True
    bn_momentum: float | None = 0.1
    sync_bn: bool = False


@dataclass
class RegularizerConfig:
    name: str = "none"
    l1: float = 0.0
    l2: float = 0.0
    dropout: float = 0.0
    l1_mode: str = "proximal"
    l2_mode: str = "penalty"
    exclude_bn_and_bias: bool = True


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    fused: bool = True


@dataclass
class SchedulerConfig:
    """The learning rate over the run's optimizer steps (``optimizer.lr`` is its peak); each
    choice in ``conf/scheduler/`` uses the keys its comment names."""

    name: str = "constant"
    warmup_steps: int | None = None  # warmup_cosine, onecycle; null: warmup_fraction of the run
    warmup_fraction: float = 0.05  # warmup_cosine, onecycle (torch's pct_start)
    step_size: int | None = None  # step: optimizer steps between decays; null: a third of the run
    gamma: float = 0.1  # step: the factor at each decay
    min_lr: float = 0.0  # cosine, warmup_cosine: where the cosine ends
    div_factor: float = 25.0  # onecycle: the first step's rate is lr / div_factor
    final_div_factor: float = 1e4  # onecycle: the last step's rate is that / final_div_factor


@dataclass
class TrainerConfig:
    epochs: int = 20
    batch_size: int = 32
    devices: int = 1
    num_nodes: int = 1
    grad_accum: int = 1
    drop_last: bool = False
    accelerator: str = "auto"
    seed: int = 0
    num_threads: Any = "auto"
    eval_every_n_epochs: int = 1
    eval_batch_size: int = 1024
    log_every_n_steps: int | None = None
    progress: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    checkpoint_every_n_steps: int | None = None
    resume: bool = False


@dataclass
class BNStatsConfig:
    every_n_steps: int | None = None
    probe_samples: int | None = None
    recalibrate: bool = False


@dataclass
class WandbConfig:
    mode: str = "auto"
    project: str = "mnistlab"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    log_every_n_steps: int | None = None  # None: about ten training rows a run
    quiet: bool = False  # W&B prints nothing and captures no console; the progress bar stays
    log_checkpoint: bool = False  # the last checkpoint as a W&B model artifact at the end


@dataclass
class LoggerConfig:
    name: str = "none"
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ObjectiveConfig:
    """What a sweep optimises: the final metric the job returns, and which way is better."""

    metric: str = "val/acc"
    direction: str = "maximize"


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    bn_stats: BNStatsConfig = field(default_factory=BNStatsConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    # At the end of a completed run, pictures and report.md in <run>/report/ (mnistlab.report),
    # written before the W&B run closes.
    report: bool = False
    # Extra loop callbacks by name, each a ``_target_`` class (mnistlab.loop.Callback)
    # that Hydra instantiates in every process of the run: ``+callbacks.x._target_=pkg.Cls``.
    callbacks: dict[str, Any] = field(default_factory=dict)


def register() -> None:
    """Make the schema the base of ``conf/config.yaml`` (its defaults list names ``schema``)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="schema", node=Config)
    OmegaConf.register_new_resolver("mnistlab.micro_batch", micro_batch, replace=True)


def micro_batch(effective: int, grad_accum: int) -> int:
    """``${mnistlab.micro_batch:128,${trainer.grad_accum}}``: the per-device batch that keeps
    an effective batch fixed while a sweep varies grad_accum (conf/experiment/step_accounting)."""
    if grad_accum < 1 or effective % grad_accum:
        raise ConfigError("trainer.grad_accum", grad_accum, f"a divisor of {effective}")
    return effective // grad_accum


OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("constant", "step", "cosine", "onecycle", "warmup_cosine")
# Final metrics (``summary.json["final"]``) a sweep may optimise; a test checks a run's final
# holds each. The test set is reported, never optimised: no test/* metric is here.
OBJECTIVES = (
    "val/acc",
    "val/loss",
    "train/acc",
    "train/loss",
    "reg/penalty",
    "weights/l1_norm",
    "weights/l2_norm",
    "weights/sparsity_exact",
    "bn/gap_mean",
)
ACCELERATORS = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
PROGRESS = ("auto", "bar", "lines", "none")
L1_MODES = ("penalty", "proximal")
L2_MODES = ("penalty", "decoupled")
WANDB_MODES = ("auto", "online", "offline", "disabled")
DIRECTIONS = ("maximize", "minimize")
LOGGERS = ("none", "wandb")


def one_line(exc: BaseException) -> str:
    """Hydra and OmegaConf errors span several lines; a user needs the first few, joined."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if exc.__cause__ is not None:
        lines += [ln.strip() for ln in str(exc.__cause__).splitlines() if ln.strip()][:1]
    skip = ("full_key", "object_type", "reference_type", "Set the env")  # Hydra's hints stay
    keep = [ln.rstrip(".") for ln in lines if not ln.startswith(skip)]
    return ": ".join(dict.fromkeys(keep[:3]))


def _schema_keys(path: str) -> list[str] | None:
    """The keys the schema allows under ``path`` ("" = the top), or None if not a section."""
    import dataclasses

    node: Any = Config
    for part in filter(None, path.split(".")):
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields or not dataclasses.is_dataclass(fields[part].default_factory):  # type: ignore[arg-type]
            return None
        node = fields[part].default_factory  # type: ignore[assignment]
    return [f.name for f in dataclasses.fields(node)]


def hydra_error_line(exc: BaseException) -> str:
    """A Hydra compose error as one line naming the key, the value and what is allowed."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and exc.options:
        group, _, choice = exc.missing_cfg_file.rpartition("/")
        return f"{group}={choice!r} is not allowed: one of {', '.join(exc.options)}"
    if isinstance(exc, OverrideParseException):
        return f"{exc.override!r} is not a valid override: {one_line(exc)}"
    first = str(exc).splitlines()[0] if str(exc) else ""
    if "raised while resolving interpolation: " in first:  # e.g. a resolver's ConfigError
        return first.split("raised while resolving interpolation: ", 1)[1]
    key_errors = (ConfigKeyError, ConfigAttributeError)  # Hydra's carry OmegaConf's as cause
    cause = exc if isinstance(exc, key_errors) else exc.__cause__
    if isinstance(cause, key_errors) and cause.full_key:
        parent, _, _ = str(cause.full_key).rpartition(".")
        allowed = _schema_keys(parent)
        if allowed:
            where = parent or "the config"
            return f"{cause.full_key} is not a key of {where}: one of {', '.join(allowed)}"
    return one_line(exc)


def check_known_keys(cfg: Any) -> None:
    """``+trainer.typo=1`` slips past Hydra's schema; refuse keys the schema doesn't know."""
    from omegaconf import DictConfig

    def walk(node: Any, path: str) -> None:
        allowed = _schema_keys(path)
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


def _check_objective(cfg: Any) -> None:
    """A metric the final summary holds for this config, and never a test metric."""
    metric, names = cfg.objective.metric, ", ".join(OBJECTIVES)
    if "test" in metric:
        allowed = f"not a test metric (the test set is reported, never optimised): one of {names}"
        raise ConfigError("objective.metric", metric, allowed)
    check_choice("objective.metric", metric, OBJECTIVES)
    if metric.startswith("val/") and not cfg.dataset.val_size:
        raise ConfigError(
            "objective.metric",
            metric,
            f"a metric the run has: dataset.val_size={cfg.dataset.val_size} turns the "
            "validation split off; set dataset.val_size (e.g. 0.1) or objective.metric=train/acc",
        )
    if metric.startswith("bn/") and not cfg.model.bn:
        allowed = "a metric the run has: model.bn=false has no BatchNorm statistics"
        raise ConfigError("objective.metric", metric, allowed)
    # a sweep that maximises a loss picks the worst job without a word: refuse it
    implied = {"loss": "minimize", "acc": "maximize"}.get(metric.rpartition("/")[2])
    if implied is not None and cfg.objective.direction != implied:
        allowed = f"{implied} for objective.metric={metric}"
        raise ConfigError("objective.direction", cfg.objective.direction, allowed)


def validate(cfg: Any) -> None:
    """Check every value Hydra's types can't (ranges, finiteness, choices, combinations);
    raise the first problem as one ConfigError line."""
    for key, rule in NUMBERS.items():
        for name, value in _values(cfg, key):
            check_number(name, value, rule)
    for key, allowed in CHOICES.items():
        for name, value in _values(cfg, key):
            check_choice(name, value, allowed)
    resolve_threads(cfg.trainer.num_threads)
    from .models import check as check_model  # imports torch: only once a job runs

    check_model(cfg.model)
    r, lr = cfg.regularizer, cfg.optimizer.lr
    if r.l2_mode == "decoupled" and lr * r.l2 >= 1:  # each step multiplies w by 1 - lr * l2
        raise ConfigError("regularizer.l2", r.l2, f"< 1/optimizer.lr = {1 / lr:g} when decoupled")
    _check_scheduler(cfg.scheduler, lr)
    _check_val_size(cfg.dataset.val_size)
    _check_objective(cfg)
    _check_wandb(cfg.logger)
    check_known_keys(cfg)


def _check_wandb(logger: Any) -> None:
    """What W&B would refuse only after training started: a project name, or ``online``
    without credentials (asks W&B's own lookup; nothing is sent)."""
    project = logger.wandb.project
    if not project or len(project) > 128 or any(c in project for c in "/\\#?%:"):
        raise ConfigError("logger.wandb.project", project, "1-128 characters, none of / \\ # ? % :")
    if logger.name == "wandb" and logger.wandb.mode == "online":
        from .sinks import wandb_credentials

        if not wandb_credentials():
            raise ConfigError(
                "logger.wandb.mode",
                "online",
                "no W&B credentials here (WANDB_API_KEY, or ~/.netrc from `wandb login`); run "
                "`wandb login`, or use logger.wandb.mode=offline (or auto: offline without)",
            )
