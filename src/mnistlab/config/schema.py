"""The config schema Hydra validates against, and the range checks it cannot express.

The dataclasses are registered in Hydra's ConfigStore as the base of ``conf/config.yaml``, so
a wrong type, an unknown key or an unknown group choice fails at compose time. What Hydra can't
say (``batch_size >= 1``, a momentum in (0, 1]) is checked by :mod:`mnistlab.config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnistlab.core.errors import ConfigError


def _conf_dir() -> Path:
    """Where Hydra reads the config groups. A wheel carries the repository's top-level
    ``conf/`` inside the package (``mnistlab/conf``, copied by ``setup.py``); a source checkout,
    as the editable install and ``PYTHONPATH=src`` use it, has it two levels above the package.
    An absolute path, so every entry (``python -m``, the console scripts, tab completion) finds
    it from any folder."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "conf"
    return packaged if packaged.is_dir() else package.parents[1] / "conf"


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
    # Your own data (a dotted path to a function) and its keyword arguments instead of a named
    # dataset: it returns (train images, train labels, test images, test labels) as tensors;
    # dataset.name is then only its label
    _target_: str | None = None
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    name: str = "mlp"
    # Your own nn.Module (a dotted path) and its keyword arguments instead of a family:
    # model._target_=pkg.Module +model.args.width=64 (name, hidden, channels, bn: unused then)
    _target_: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
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
class EarlyStoppingConfig:
    """Stop when the objective (``objective.metric``) has not improved by more than
    ``min_delta`` for ``patience`` evaluations in a row; null patience: never."""

    patience: int | None = None
    min_delta: float = 0.0


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
    # Clip the accumulation window's gradient once per optimizer step; null: no clipping.
    grad_clip_norm: float | None = None  # the global L2 norm at most this
    grad_clip_value: float | None = None  # every element in [-value, value]
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class BNStatsConfig:
    every_n_steps: int | None = None
    probe_samples: int | None = None
    recalibrate: bool = False


@dataclass
class WandbConfig:
    """How the run appears in W&B. ``name`` and ``group``: None picks them from the overrides
    (``logger.wandb`` in docs/wandb.md); any string, interpolations included, is used as is."""

    mode: str = "auto"
    project: str = "mnistlab"
    entity: str | None = None
    name: str | None = None  # None: the swept values (a sweep) or the overrides (a run)
    group: str | None = None  # None: the overrides less trainer.seed (seeds of one config)
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    job_type: str = "train"
    log_every_n_steps: int | None = None  # None: about ten training rows a run
    quiet: bool = True  # W&B prints nothing and captures no console; the progress bar stays
    log_checkpoint: bool = False  # the last checkpoint as a W&B model artifact at the end
    sweep_report: bool = True  # a sweep's report pictures, once, to a W&B run of its own


@dataclass
class TensorBoardConfig:
    """``logger=tensorboard`` / ``logger=wandb_tensorboard``: event files in the run folder."""

    dir: str = "tensorboard"  # relative to the run folder (or absolute)


@dataclass
class LoggerConfig:
    name: str = "none"
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)


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
    # Extra loop callbacks by name, each a ``_target_`` class (mnistlab.engine.loop.Callback)
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
    "train_eval/acc",
    "train_eval/loss",
    "reg/penalty",
    "weights/l1_norm",
    "weights/l2_norm",
    "weights/sparsity_exact",
    "bn/gap_mean",
)
# The objectives an evaluation row measures, by the row's key: best.pt is chosen and early
# stopping decided on these at every evaluation. ``train_eval/*`` (the whole training split
# in eval mode, at the end) is read there from the test-sized slice of training (``train_slice/*``).
# Any other objective is known only at the end: best.pt is then the last checkpoint.
EVALUATED = {
    "val/acc": "val/acc",
    "val/loss": "val/loss",
    "train_eval/acc": "train_slice/acc",
    "train_eval/loss": "train_slice/loss",
}
ACCELERATORS = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
PROGRESS = ("auto", "bar", "lines", "none")
L1_MODES = ("penalty", "proximal")
L2_MODES = ("penalty", "decoupled")
WANDB_MODES = ("auto", "online", "offline", "disabled")
DIRECTIONS = ("maximize", "minimize")
# Each ``logger`` choice (conf/logger/) and the sinks it adds to the console and metrics.jsonl
LOGGER_SINKS: dict[str, tuple[str, ...]] = {
    "none": (),
    "wandb": ("wandb",),
    "tensorboard": ("tensorboard",),
    "wandb_tensorboard": ("wandb", "tensorboard"),
}
LOGGERS = tuple(LOGGER_SINKS)


def uses(logger: Any, sink: str) -> bool:
    """Whether the ``logger`` config node's choice includes ``sink`` (``wandb``,
    ``tensorboard``)."""
    return sink in LOGGER_SINKS.get(logger.name, ())
