"""``hydra/sweeper=optuna``: the config Hydra composes and the plugin it instantiates.

Hydra imports this module when it scans for plugins, on every run: it registers the configs
and imports neither Optuna nor the search, which load only when this sweeper is chosen. The
config keeps the names of Hydra's own Optuna sweeper (``params``, ``n_trials``, ``n_jobs``,
``direction``, ``storage``, ``study_name``, ``sampler``) so its presets carry over.
"""

# No `from __future__ import annotations` here: Hydra's scanner runs this module before it is
# in sys.modules, where dataclasses look up string annotations.
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig


@dataclass
class TPESamplerConf:
    """Optuna's default sampler, seeded so that a search can be repeated."""

    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = 0
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    multivariate: bool = False
    consider_endpoints: bool | None = None


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = 0


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.mnistlab_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    sampler: Any = MISSING
    # maximize or minimize the job's return value (the run's objective.metric); null: the
    # config's objective.direction (read by the sweeper, so `--cfg hydra --resolve` works)
    direction: str | None = None
    # finished trials in total, over every resume of the same sweep folder
    n_trials: int = 20
    # trials launched together (one batch); null: the launcher's parallel jobs (joblib's n_jobs)
    n_jobs: int | None = None
    # null: a journal file in the sweep folder; or an Optuna storage URL (sqlite:///x.db)
    storage: str | None = None
    # null: <job name>-<sweep folder name>
    study_name: str | None = None
    # the search space, in Hydra's sweep syntax: interval(a,b), tag(log, interval(a,b)),
    # tag(int, interval(a,b)), choice(a,b), a,b, range(a,b,step), glob(*); plain values stay fixed
    params: dict[str, str] | None = None


class OptunaSweeper(Sweeper):
    """Hands the sweep to :func:`mnistlab.sweeps.search.run` with the launcher Hydra configured."""

    def __init__(
        self,
        sampler: Any,
        direction: str | None,
        n_trials: int,
        n_jobs: int | None,
        storage: str | None,
        study_name: str | None,
        params: DictConfig | None,
    ) -> None:
        from mnistlab.sweeps.search import Options

        self.options = Options(sampler, direction, n_trials, n_jobs, storage, study_name, params)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from mnistlab.sweeps.search import run

        return run(self, self.options, arguments)


def register() -> None:
    store = ConfigStore.instance()
    store.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="mnistlab")
    for name, node in (("tpe", TPESamplerConf), ("random", RandomSamplerConf)):
        store.store(group="hydra/sweeper/sampler", name=name, node=node, provider="mnistlab")


register()
