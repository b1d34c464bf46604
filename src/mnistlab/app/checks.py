"""Every check of a job's config that needs no data, in one pass before any work: the
config's own (:func:`mnistlab.config.validate`), then what needs more than the config to
say: the thread count, the model's shape (torch) and W&B credentials. ``plan``, ``eval`` and
``train`` all call :func:`check`, so each refuses exactly what the others refuse."""

from __future__ import annotations

from typing import Any

from mnistlab.config import validate
from mnistlab.config.schema import uses
from mnistlab.core.errors import ConfigError
from mnistlab.engine import models
from mnistlab.logger.sinks import wandb_credentials
from mnistlab.processes.threads import resolve_threads


def check(cfg: Any) -> None:
    """Raise the first problem of ``cfg`` as one :class:`ConfigError` line."""
    validate(cfg)
    resolve_threads(cfg.trainer.num_threads)
    models.check(cfg.model)
    online = uses(cfg.logger, "wandb") and cfg.logger.wandb.mode == "online"
    if online and not wandb_credentials():
        raise ConfigError(
            "logger.wandb.mode",
            "online",
            "no W&B credentials here (WANDB_API_KEY, or ~/.netrc from `wandb login`); run "
            "`wandb login`, or use logger.wandb.mode=offline (or auto: offline without)",
        )
