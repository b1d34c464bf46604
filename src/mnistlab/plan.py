"""``python -m mnistlab.plan <overrides>``: the step accounting of a run, without training.

Takes the same overrides as ``mnistlab.train`` (composed by Hydra against the same config),
and needs no data on disk and no devices: ``trainer.devices=8 trainer.num_nodes=2`` works
on a laptop.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from .config import ConfigError, hydra_error_line, register, validate
from .data import TRAIN_SIZES
from .steps import StepPlan

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def plan_from_overrides(overrides: list[str]) -> tuple[StepPlan, int]:
    """Compose the config as the training app would and derive its plan."""
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    validate(cfg)
    t, d = cfg.trainer, cfg.dataset
    n = d.limit_train if d.limit_train is not None else TRAIN_SIZES[d.name]
    if d.limit_train is not None and d.limit_train > TRAIN_SIZES[d.name]:
        raise ConfigError(
            "dataset.limit_train", d.limit_train, f"at most {TRAIN_SIZES[d.name]} for {d.name}"
        )
    world = t.devices * t.num_nodes
    return StepPlan(n, t.epochs, t.batch_size, world, t.grad_accum, t.drop_last), t.num_nodes


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args
    args = [a for a in args if a != "--json"]
    if any(a in ("-h", "--help") for a in args):
        print("usage: python -m mnistlab.plan [--json] [overrides ...]  (same overrides as train)")
        return 0
    try:
        plan, nodes = plan_from_overrides(args)
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        print(f"error: {hydra_error_line(e)}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print(plan.banner(nodes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
