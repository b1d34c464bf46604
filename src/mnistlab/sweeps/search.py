"""Hyper-parameter search with Optuna behind ``hydra/sweeper=optuna``, resumable.

The study lives in the sweep folder (an Optuna journal file, ``optuna_journal.log``), so a
search that was stopped continues when the same command runs again with the same
``hydra.sweep.dir`` (``trainer.resume=true`` may be added, as the stop message says): finished
trials stay as they are; a trial the stopped search left running is marked failed and run
again with the same parameters (once), in its own job folder, continuing from its checkpoint;
the sampler is seeded anew from its seed and the trials already drawn, so it does not draw the
same points again; and the search stops when ``n_trials`` trials have finished in total. Each
trial is one Hydra job whose folder is numbered by the trial number; a job that fails or
returns NaN is a failed trial and the search goes on. At the end the best trial goes to
``optimization_results.yaml``, with the study's failed trials counted as the study holds them.

The search space is written as Hydra's sweep syntax (``hydra.sweeper.params`` and the
command line), read with Hydra's own override parser, as in Hydra's Optuna sweeper.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override, Transformer
from hydra.core.utils import JobReturn
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
)
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from mnistlab.config import COUNT, DIRECTIONS, check_choice, check_number, compose_message
from mnistlab.core.errors import ConfigError
from mnistlab.core.files import atomic_write_bytes
from mnistlab.engine.checkpoint import LOCAL
from mnistlab.processes.threads import parallel_jobs

log = logging.getLogger("mnistlab")

JOURNAL = "optuna_journal.log"
RESULTS = "optimization_results.yaml"
RETRY_OF = "retry_of"  # trial attribute: the number of the interrupted trial this one re-runs
SEARCH = "search"  # study attribute: the search space and fixed overrides it was started with

Space = dict[str, BaseDistribution]
Job = tuple[optuna.Trial, list[str]]  # a trial and its job's overrides


@dataclass
class Options:
    """``hydra.sweeper``'s keys, the sampler already instantiated by Hydra."""

    sampler: Any
    direction: str | None  # None: the config's objective.direction
    n_trials: int
    n_jobs: int | None
    storage: str | None
    study_name: str | None
    params: DictConfig | None


def search_space(arguments: Sequence[str], config_loader: Any = None) -> tuple[Space, list[str]]:
    """Hydra's sweep syntax as Optuna distributions; plain overrides stay fixed for every
    trial. A later override of the same key wins (the command line over the preset)."""
    space: Space = {}
    fixed: dict[str, str] = {}
    for o in OverridesParser.create(config_loader=config_loader).parse_overrides(list(arguments)):
        key = o.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if o.is_sweep_override():
            space[key] = distribution(o)
        else:
            fixed[key] = o.input_line or f"{key}={o.get_value_element_as_str()}"
    return space, list(fixed.values())


def distribution(o: Override) -> BaseDistribution:
    """``interval(a,b)`` (``tag(log, ...)``, ``tag(int, ...)``) and ``range(a,b,step)`` (its
    stop excluded, as in Python) are ordered; ``choice(...)``, ``a,b`` and ``glob(*)`` are
    categorical. ``shuffle`` means nothing to a sampler: the order written is kept."""
    value = o.value()
    try:
        if o.is_interval_sweep():
            log_scale = "log" in value.tags
            if "int" in value.tags:
                return IntDistribution(int(value.start), int(value.end), log=log_scale)
            return FloatDistribution(value.start, value.end, log=log_scale)
        if o.is_range_sweep():
            values = list(value.range())
            if not values:
                raise ValueError("a range with at least one value")
            low, high, step = min(values), max(values), abs(value.step)
            if all(isinstance(v, int) for v in values):
                return IntDistribution(low, high, step=step)
            return FloatDistribution(low, high, step=step)
        items = value.list if isinstance(value, ChoiceSweep) else list(o.sweep_iterator())
        return CategoricalDistribution([Transformer.encode(x) for x in items])
    except ValueError as e:
        raise ConfigError(o.get_key_element(), o.get_value_string(), str(e)) from None


def overrides_of(params: dict[str, Any], fixed: Sequence[str]) -> list[str]:
    """A trial's job: the fixed overrides, then its parameters as Hydra values."""
    return [*fixed, *(f"{k}={Transformer.str(v)}" for k, v in params.items())]


def first_point(space: Space) -> dict[str, Any]:
    """One point of the space (each lowest value, each first choice), for composing a job
    before the study exists: a typo fails the command instead of every trial."""
    return {
        k: d.choices[0] if isinstance(d, CategoricalDistribution) else d.low  # type: ignore[attr-defined]
        for k, d in space.items()
    }


def run(sweeper: Any, opts: Options, arguments: Sequence[str]) -> list[Sequence[JobReturn]]:
    """The search: open (or resume) the study, launch batches of trials until ``n_trials``
    have finished, write the best trial. ``sweeper`` holds Hydra's config and launcher."""
    cfg: DictConfig = sweeper.config
    if opts.direction is None:
        opts = replace(opts, direction=OmegaConf.select(cfg, "objective.direction"))
        check_choice("objective.direction", opts.direction, DIRECTIONS)
    check_choice("hydra.sweeper.direction", opts.direction, DIRECTIONS)
    check_number("hydra.sweeper.n_trials", opts.n_trials, COUNT)
    n_jobs = parallel_jobs(cfg.hydra) if opts.n_jobs is None else opts.n_jobs
    check_number("hydra.sweeper.n_jobs", n_jobs, COUNT)
    params = [f"{k}={v}" for k, v in (opts.params or {}).items()]
    space, fixed = search_space([*params, *arguments], sweeper.hydra_context.config_loader)
    sweeper.validate_batch_is_legal([overrides_of(first_point(space), fixed)])

    sweep_dir = Path(cfg.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(opts, sweep_dir, cfg.hydra.job.name, space, fixed)
    study.sampler = resumed_sampler(cfg, study, opts.sampler)
    requeue_interrupted(study)
    returns = []
    while (to_go := opts.n_trials - len(counted(study))) > 0:
        trials = [study.ask(space) for _ in range(min(to_go, n_jobs))]
        returns.append(_run_batch(sweeper, study, trials, fixed))
    write_results(study, sweep_dir, OmegaConf.select(cfg, "objective.metric"))
    return returns


def open_study(
    opts: Options, sweep_dir: Path, job_name: str, space: Space, fixed: list[str]
) -> optuna.Study:
    """Create the study, or load the one a previous run of this search stored: only if it
    searches the same space with the same fixed overrides (``objective`` among them) in the
    same direction."""
    storage = opts.storage or JournalStorage(JournalFileBackend(str(sweep_dir / JOURNAL)))
    name = opts.study_name or f"{job_name}-{sweep_dir.name}"
    if name in optuna.get_all_study_names(storage):  # loading logs nothing before a refusal
        study = optuna.load_study(study_name=name, storage=storage, sampler=opts.sampler)
    else:
        study = optuna.create_study(
            storage=storage, sampler=opts.sampler, study_name=name, direction=opts.direction
        )
    kept = [f for f in fixed if not is_local(f.split("=", 1)[0].lstrip("+~"))]
    search = {"space": {k: distribution_to_json(d) for k, d in space.items()}, "fixed": kept}
    before = study.user_attrs.get(SEARCH)
    if before is None:
        study.set_user_attr(SEARCH, search)
    elif before != search:
        raise ConfigError(
            "hydra.sweep.dir",
            str(sweep_dir),
            "a new folder, or the search whose study it holds (this one differs in "
            + _changes(before, search)
            + ")",
        )
    stored = study.direction.name.lower()
    if stored != opts.direction:
        raise ConfigError("hydra.sweeper.direction", opts.direction, f"{stored}, the study's")
    done = counted(study)
    log.info(
        "Optuna study %r in %s: %s, %d of %d trials finished",
        name,
        opts.storage or sweep_dir / JOURNAL,
        opts.direction,
        len(done),
        opts.n_trials,
    )
    return study


def is_local(key: str) -> bool:
    """A key a resumed search may add, drop or change (``trainer.resume``, the progress bar,
    extra callbacks): it says how this process runs the jobs, not what is searched."""
    return any(key == k or key.startswith(k + ".") for k in LOCAL)


def _changes(stored: dict[str, Any], now: dict[str, Any]) -> str:
    """What differs between the stored search and this command's, for the one error line."""
    was, new = stored["space"], now["space"]
    keys = sorted(k for k in was.keys() | new.keys() if was.get(k) != new.get(k))
    fixed = sorted(set(stored["fixed"]) ^ set(now["fixed"]))
    return ", ".join(keys + fixed)


def resumed_sampler(cfg: DictConfig, study: optuna.Study, sampler: Any) -> Any:
    """The sampler for a study that already holds trials: the configured one, seeded with its
    seed plus the number of trials, so a resumed search neither repeats the points it drew
    before the stop (a sampler restarted from its seed would) nor depends on chance. A new
    study, or an unseeded sampler, keeps ``sampler``."""
    node = OmegaConf.select(cfg, "hydra.sweeper.sampler")
    drawn = len(study.trials)
    if not drawn or node is None or node.get("seed") is None:
        return sampler
    return instantiate(node, seed=int(node.seed) + drawn)


def requeue_interrupted(study: optuna.Study) -> None:
    """Trials a killed search left running: failed, and queued again with the same
    parameters. A trial that is itself a re-run is not queued a third time: it counts as
    failed, so a trial that kills the search each time cannot stall it."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        if RETRY_OF in t.user_attrs:
            log.warning("trial %d was interrupted again: it counts as failed", t.number)
            continue
        study.enqueue_trial(t.params, user_attrs={RETRY_OF: t.number})
        log.warning("trial %d was interrupted: it continues in its folder", t.number)


def counted(study: optuna.Study) -> list[FrozenTrial]:
    """The finished trials that count toward ``n_trials``: all but those run again."""
    trials = study.get_trials(deepcopy=False)
    rerun = {t.user_attrs.get(RETRY_OF) for t in trials}
    return [t for t in trials if t.state.is_finished() and t.number not in rerun]


def _run_batch(
    sweeper: Any, study: optuna.Study, trials: list[optuna.Trial], fixed: list[str]
) -> list[JobReturn]:
    """Launch the trials that compose as one batch of jobs numbered by trial number (a re-run
    by the number of the trial it re-runs: it resumes in that folder); tell the study each
    outcome. A job whose config cannot be composed is a failed trial."""
    ready: list[Job] = []
    for trial in trials:
        overrides = overrides_of(trial.params, fixed)
        if RETRY_OF in trial.user_attrs:
            overrides.append("trainer.resume=true")
        trial.set_user_attr("overrides", overrides)
        try:
            sweeper.validate_batch_is_legal([overrides])
        except Exception as e:
            message = compose_message(e)
            if message is None:
                raise
            _fail(study, trial, message)
            continue
        ready.append((trial, overrides))
    returns: list[JobReturn] = []
    for start, group in _consecutive(ready):
        returns += sweeper.launcher.launch([o for _, o in group], initial_job_idx=start)
    for (trial, _), ret in zip(ready, returns, strict=True):
        _tell(study, trial, ret)
    return returns


def job_number(trial: optuna.Trial | FrozenTrial) -> int:
    """The job folder a trial runs in: its own number, or that of the trial it re-runs."""
    return int(trial.user_attrs.get(RETRY_OF, trial.number))


def _consecutive(ready: list[Job]) -> list[tuple[int, list[Job]]]:
    """Runs of consecutive job numbers: a launcher numbers a batch's jobs from its first
    (the trials of a batch are consecutive unless another process asks the same study)."""
    groups: list[tuple[int, list[Job]]] = []
    for item in ready:
        start, group = groups[-1] if groups else (None, [])
        if start is not None and job_number(item[0]) == start + len(group):
            group.append(item)
        else:
            groups.append((job_number(item[0]), [item]))
    return groups


def _tell(study: optuna.Study, trial: optuna.Trial, ret: JobReturn) -> None:
    """The job's return value is the objective; an exception or NaN fails the trial."""
    if ret.hydra_cfg is not None:
        trial.set_user_attr("job_dir", str(ret.hydra_cfg.hydra.runtime.output_dir))
    try:
        value = float(ret.return_value)
    except Exception as e:  # the job raised (Hydra keeps the exception in its return)
        _fail(study, trial, f"{type(e).__name__}: {e}")
        return
    if not math.isfinite(value):
        _fail(study, trial, f"the job returned {value}")
        return
    study.tell(trial, value)
    log.info("trial %d: %.6g with %s", trial.number, value, trial.params)


def _fail(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr("error", reason)
    study.tell(trial, state=TrialState.FAIL)
    log.warning("trial %d failed (%s); the search goes on", trial.number, reason)


def write_results(study: optuna.Study, sweep_dir: Path, metric: str | None) -> None:
    """``optimization_results.yaml`` (the keys of Hydra's Optuna sweeper, and more): the best
    trial, its value, parameters and job folder; how many trials completed and failed, and
    which were interrupted and run again (the study holds those as failed too)."""
    done = counted(study)
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    rerun = sorted(int(t.user_attrs[RETRY_OF]) for t in study.trials if RETRY_OF in t.user_attrs)
    results: dict[str, Any] = {
        "name": "optuna",
        "study_name": study.study_name,
        "direction": study.direction.name.lower(),
        "metric": metric,
        "trials": {
            "completed": len(complete),
            "failed": len(done) - len(complete),
            "interrupted_and_rerun": rerun,
        },
        "best_trial": None,
        "best_value": None,
        "best_params": None,
        "best_job_dir": None,
    }
    if complete:
        best = study.best_trial
        results.update(
            best_trial=best.number,
            best_value=best.value,
            best_params=best.params,
            best_job_dir=best.user_attrs.get("job_dir"),
        )
        log.info("best trial %d: %s=%.6g with %s", best.number, metric, best.value, best.params)
    else:
        log.error("no trial completed: see the job folders in %s", sweep_dir)
    yaml = OmegaConf.to_yaml(OmegaConf.create(results))
    atomic_write_bytes(sweep_dir / RESULTS, yaml.encode())
