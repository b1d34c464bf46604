"""``python -m mnistlab.plan <overrides>``: the step accounting of a run, without training.

Takes the same overrides as ``mnistlab.train`` (composed by Hydra against the same config),
checks them as the training app does, and needs no data on disk and no devices:
``trainer.devices=8 trainer.num_nodes=2`` works on a laptop.
"""

from __future__ import annotations

import json
import sys

from hydra import compose, initialize_config_dir

from mnistlab.app.checks import check
from mnistlab.config import CONF_DIR, compose_message, register
from mnistlab.core.errors import quiet_on_closed_pipe, report
from mnistlab.engine.steps import StepPlan


def plan_from_overrides(overrides: list[str]) -> tuple[StepPlan, int]:
    """Compose the config as the training app would and derive its plan (and node count)."""
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return check(cfg), cfg.trainer.num_nodes


@quiet_on_closed_pipe
def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args
    args = [a for a in args if a != "--json"]
    if any(a in ("-h", "--help") for a in args):
        print("usage: python -m mnistlab.plan [--json] [overrides ...]  (same overrides as train)")
        return 0
    try:
        plan, nodes = plan_from_overrides(args)
    except Exception as e:
        message = compose_message(e)
        if message is None:
            raise
        return report(message)
    print(json.dumps(plan.as_dict(), indent=2) if as_json else plan.banner(nodes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
