"""The config schema Hydra validates against, and the range checks it cannot express.

The dataclasses are registered in Hydra's ConfigStore as the base of ``conf/config.yaml``, so
a wrong type, an unknown key or an unknown group choice fails at compose time. What Hydra can't
say (``batch_size >= 1``, a momentum in (0, 1]) is checked by :func:`validate`, which raises one
:class:`~mnistlab.errors.ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .threads import resolve_threads


def _conf_dir() -> Path:
    """Where Hydra reads the config groups. A wheel ships the repository's top-level ``conf/``
    inside the package (``mnistlab/conf``, pyproject's ``package-dir``); a source checkout, as
    the editable install and ``PYTHONPATH=src`` use it, has it two levels above this file. An
    absolute path, so every entry (``python -m``, the console scripts, tab completion) finds
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


@dataclass
class LoggerConfig:
    name: str = "none"
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ObjectiveConfig:
    """What a sweep optimises: the final metric the job returns, and which way is better."""

    metric: str = "test/acc"
    direction: str = "maximize"


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    bn_stats: BNStatsConfig = field(default_factory=BNStatsConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
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
    skip = ("full_key", "object_type", "reference_type", "Set the env", "To append")
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


def _at_least(key: str, value: Any, low: int) -> None:
    if value < low:
        raise ConfigError(key, value, f"an integer >= {low}")


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, value, "one of " + ", ".join(allowed))


def validate(cfg: Any) -> None:
    """Check every range Hydra's types can't; raise the first problem as a ConfigError."""
    t, m, r, o, d, b = (
        cfg.trainer,
        cfg.model,
        cfg.regularizer,
        cfg.optimizer,
        cfg.dataset,
        cfg.bn_stats,
    )
    _at_least("trainer.epochs", t.epochs, 1)
    _at_least("trainer.batch_size", t.batch_size, 1)
    _at_least("trainer.devices", t.devices, 1)
    _at_least("trainer.num_nodes", t.num_nodes, 1)
    _at_least("trainer.grad_accum", t.grad_accum, 1)
    _at_least("trainer.eval_every_n_epochs", t.eval_every_n_epochs, 1)
    _at_least("trainer.eval_batch_size", t.eval_batch_size, 1)
    if t.log_every_n_steps is not None:
        _at_least("trainer.log_every_n_steps", t.log_every_n_steps, 1)
    if t.checkpoint_every_n_steps is not None:
        _at_least("trainer.checkpoint_every_n_steps", t.checkpoint_every_n_steps, 1)
    _one_of("trainer.accelerator", t.accelerator, ACCELERATORS)
    _one_of("trainer.precision", t.precision, PRECISIONS)
    _one_of("trainer.progress", t.progress, PROGRESS)
    resolve_threads(t.num_threads)
    from .models import check as check_model  # imports torch: only once a job runs

    check_model(m)
    if m.bn_momentum is not None and not 0.0 < m.bn_momentum <= 1.0:
        raise ConfigError("model.bn_momentum", m.bn_momentum, "a number in (0, 1], or null")
    if r.l1 < 0:
        raise ConfigError("regularizer.l1", r.l1, "a number >= 0")
    if r.l2 < 0:
        raise ConfigError("regularizer.l2", r.l2, "a number >= 0")
    if not 0.0 <= r.dropout < 1.0:
        raise ConfigError("regularizer.dropout", r.dropout, "a number in [0, 1)")
    _one_of("regularizer.l1_mode", r.l1_mode, L1_MODES)
    _one_of("regularizer.l2_mode", r.l2_mode, L2_MODES)
    _one_of("optimizer.name", o.name, OPTIMIZERS)
    if o.lr <= 0:
        raise ConfigError("optimizer.lr", o.lr, "a number > 0")
    if not 0.0 <= o.momentum < 1.0:
        raise ConfigError("optimizer.momentum", o.momentum, "a number in [0, 1)")
    for key, lim in (("dataset.limit_train", d.limit_train), ("dataset.limit_test", d.limit_test)):
        if lim is not None:
            _at_least(key, lim, 1)
    if b.every_n_steps is not None:
        _at_least("bn_stats.every_n_steps", b.every_n_steps, 1)
    if b.probe_samples is not None:
        _at_least("bn_stats.probe_samples", b.probe_samples, 1)
    _one_of("logger.name", cfg.logger.name, LOGGERS)
    _one_of("logger.wandb.mode", cfg.logger.wandb.mode, WANDB_MODES)
    _one_of("objective.direction", cfg.objective.direction, DIRECTIONS)
    if cfg.logger.wandb.log_every_n_steps is not None:
        _at_least("logger.wandb.log_every_n_steps", cfg.logger.wandb.log_every_n_steps, 1)
    check_known_keys(cfg)
