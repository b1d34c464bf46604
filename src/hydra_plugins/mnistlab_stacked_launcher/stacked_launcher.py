"""``hydra/launcher=stacked``: the config Hydra composes and the plugin it instantiates.

Hydra imports this module when it scans for plugins, on every run: it registers the config
and imports neither torch nor mnistlab, which load only when this launcher is chosen.
"""

# No `from __future__ import annotations` here: Hydra's scanner runs this module before it is
# in sys.modules, where dataclasses look up string annotations.
from collections.abc import Sequence
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class StackedLauncherConf:
    _target_: str = "hydra_plugins.mnistlab_stacked_launcher.stacked_launcher.StackedLauncher"
    # The most jobs trained as one computation: each holds its weights, gradients, optimizer
    # state and activations in the group's tensors (docs/guide.md: Stacked sweeps).
    max_group: int = 16


class StackedLauncher(Launcher):
    """Hands the sweep's jobs to :func:`mnistlab.sweeps.stacking.launch`."""

    def __init__(self, max_group: int) -> None:
        self.max_group = max_group

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from mnistlab.sweeps.stacking import launch

        return launch(self.hydra_context, self.task_function, self.config, job_overrides,
                      initial_job_idx, self.max_group)  # fmt: skip


ConfigStore.instance().store(
    group="hydra/launcher", name="stacked", node=StackedLauncherConf, provider="mnistlab"
)
