"""``python -m mnistlab.train``: the Hydra entry point. Hydra composes the config; the job
itself (lock, checks, training, ``summary.json``, exit code) is :mod:`mnistlab.app.lifecycle`'s.
:func:`cli` turns Hydra's compose errors into one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import os
import sys
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mnistlab.app import lifecycle
from mnistlab.config import CONF_DIR, compose_message, register
from mnistlab.core.errors import report
from mnistlab.processes import distributed

register()


@distributed.one_folder_under_torchrun
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    started = lifecycle.IMPORTED_AT if hc.mode == RunMode.RUN else time.perf_counter()
    return lifecycle.run(cfg, hc, started)


def cli() -> None:
    """``main`` with Hydra's compose errors (unknown key or choice, wrong type, bad override
    syntax) as one ``error:`` line and exit code 2 instead of Hydra's multi-line report.

    Hydra prints those itself inside ``run_and_report`` unless ``HYDRA_FULL_ERROR=1``, so we
    set it, catch what comes out and condense it; a user who set it gets the full trace. The
    job itself (:func:`run`) lets no exception out, so whatever reaches here is the config's."""
    user_value = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Exception as e:
        message = compose_message(e)
        if user_value == "1" or message is None:
            raise
        sys.exit(report(message))
    except KeyboardInterrupt:  # Ctrl-C outside training, or a second one inside: stop now
        print("interrupted: stopped at once, nothing more saved", file=sys.stderr)
        sys.exit(130)
    finally:
        if user_value is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = user_value


if __name__ == "__main__":
    cli()
