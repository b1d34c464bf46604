"""A saved run, evaluated again from its checkpoint (``python -m mnistlab.eval``).

The config is the one the checkpoint was written with, the run's resolved config
(``.hydra/config.yaml`` may since have been rewritten by a resume attempt), plus the command
line's ``key=value`` overrides, checked as a run checks its config. The data and the model are
rebuilt as a run builds them (:func:`mnistlab.app.job.data_and_model`), the weights and BN
buffers loaded, and then measured: loss and accuracy on every split besides ``train``, and the
gaps of the BN running statistics to the exact statistics of the training split, the
measurement of the run's last BN point (:class:`mnistlab.bn.monitor.Monitor`);
``bn_stats.recalibrate=true`` adds the test accuracy after PreciseBN. The checkpoint is never
changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mnistlab.app.checks import check
from mnistlab.config import Config, compose_message, register
from mnistlab.core.errors import UserError
from mnistlab.engine import checkpoint
from mnistlab.engine.checkpoint import CheckpointError

USAGE_HINT = "e.g. bn_stats.recalibrate=true or trainer.accelerator=cpu"


CHECKPOINTS = {"last": checkpoint.LAST, "best": checkpoint.BEST}
WHY_NONE = {
    "last": "not a run folder, or its run stopped before the first checkpoint",
    "best": "its run has not evaluated yet, or ended before its objective was measured",
}


def locate(target: Path, which: str = "last") -> tuple[Path, Path]:
    """``(checkpoint, run folder)`` for a run folder (its ``which`` checkpoint: ``last`` or
    ``best``) or a checkpoint file inside one."""
    if target.is_dir():
        ckpt = target / CHECKPOINTS[which]
        if not ckpt.is_file():
            raise CheckpointError(f"{target} holds no {CHECKPOINTS[which]}: {WHY_NONE[which]}")
        return ckpt, target
    if not target.exists():
        raise CheckpointError(f"{target} does not exist: give a run folder or a checkpoint file")
    run_dir = target.parent.parent if target.parent.name == "checkpoints" else target.parent
    return target, run_dir


def run_config(saved: Mapping[str, Any], overrides: Sequence[str], ckpt: Path) -> DictConfig:
    """The checkpoint's config in the schema, PreciseBN off unless the command line asks for
    it, then the command line's ``key=value`` overrides; checked as a run checks its config."""
    register()
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), saved)
    except OmegaConfBaseException as e:
        msg = compose_message(e)
        raise CheckpointError(f"{ckpt} holds a config this version can't read: {msg}") from None
    cfg.bn_stats.recalibrate = False  # the checkpoint as saved; PreciseBN only when asked
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise UserError(f"{item!r} is not an override: give key=value, {USAGE_HINT}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            msg = str(compose_message(e))
            raise UserError(msg if msg.startswith(key) else f"{item}: {msg}") from None
    check(cfg)
    assert isinstance(cfg, DictConfig)
    return cfg


def evaluate_checkpoint(cfg: DictConfig, state: Mapping[str, Any], ckpt: Path) -> dict[str, Any]:
    """Rebuild the run's data and model, load the checkpoint, measure: the report's body."""

    from mnistlab.app import job
    from mnistlab.bn.monitor import Monitor
    from mnistlab.engine import models
    from mnistlab.engine.loop import evaluate
    from mnistlab.engine.steps import Cadence, StepCounter
    from mnistlab.processes.threads import use_threads

    t = cfg.trainer
    use_threads(t.num_threads)
    ds, model = job.data_and_model(cfg, job.select_device(t.accelerator))
    checkpoint.load_weights(state, model, ckpt)

    def scores(split: Any) -> dict[str, float]:
        return evaluate(model, split, t.eval_batch_size, t.precision)

    metrics = {
        f"{name}/{k}": v
        for name, split in ds.splits().items()
        if name != "train"
        for k, v in scores(split).items()
    }
    counter = StepCounter(**state["counter"])
    steps = max(1, counter.optimizer_steps)
    monitor = Monitor(
        model, ds.train.x, batch_size=t.batch_size, precision=t.precision, seed=t.seed,
        cadence=Cadence.of(steps, has_bn=bool(models.bn_layers(model))),
        probe_samples=cfg.bn_stats.probe_samples,
    )  # fmt: skip
    _, bn_part = monitor.finish(
        counter.micro_batches,
        counter.optimizer_steps,
        cfg.bn_stats.recalibrate,
        lambda: scores(ds.test)["acc"],
    )
    metrics.update(bn_part.pop("final", {}))
    return {"counted": counter.counted(), "metrics": metrics, **bn_part}


def evaluate_run(
    target: Path, overrides: Sequence[str], which: str = "last"
) -> tuple[dict[str, Any], Path]:
    """The whole report for a run folder (its ``which`` checkpoint) or a checkpoint, and the
    run folder it belongs to."""
    ckpt, run_dir = locate(target, which)
    state = checkpoint.read(ckpt)
    cfg = run_config(state["config"], overrides, ckpt)
    result = {"checkpoint": str(ckpt), **evaluate_checkpoint(cfg, state, ckpt)}
    result["overrides"] = list(overrides)
    result["config"] = OmegaConf.to_container(cfg, resolve=True)
    return result, run_dir
