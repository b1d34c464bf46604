"""Hyper-parameter search with the real Optuna through the real Hydra app
(``hydra/sweeper=optuna``): trials, failures, the best trial, and a search killed mid-trial
that resumes.

The searches run in this process (:func:`support.app`) except where a trial kills its process;
the studies are read back with Optuna's own API from the journal file in the sweep folder.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from mnistlab.config import CONF_DIR, register
from mnistlab.core.errors import ConfigError
from mnistlab.sweeps.search import (
    JOURNAL,
    RESULTS,
    RETRY_OF,
    first_point,
    overrides_of,
    search_space,
)

from faults import KillInJob, RaiseInJob, override
from support import app, read_summary, run_app

FAST = ("trainer.epochs=1", "trainer.num_threads=1", "logger=none", "trainer.progress=none")
JOB_NUM = "${hydra:job.num}"  # each job's own number, resolved inside the job


def search(
    sweep_dir: Path, *overrides: str, process: bool = False
) -> subprocess.CompletedProcess[str]:
    """The search in this process, or (``process``) in a process of its own: one whose trial
    may be SIGKILLed."""
    if process:
        return run_app(sweep_dir, *FAST, *overrides, multirun=True, timeout=300)
    return app(sweep_dir, *FAST, *overrides, multirun=True)


def load_study(sweep_dir: Path) -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(sweep_dir / JOURNAL)))
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def results(sweep_dir: Path) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(sweep_dir / RESULTS))  # type: ignore[return-value]


def test_search_space_reads_hydra_sweep_syntax() -> None:
    space, fixed = search_space(
        [
            "optimizer.lr=tag(log, interval(0.001, 0.5))",
            "model.bn_momentum=interval(0.01,0.3)",
            "trainer.batch_size=choice(16, 32)",
            "trainer.grad_accum=range(1, 10, 4)",  # Python's range: 1, 5, 9
            "trainer.seed=tag(int, interval(0, 9))",
            "regularizer.l2=range(0, 1, 0.25)",
            "regularizer=none,l2",
            "trainer.epochs=3",
            "+callbacks.x.a=1",
            "trainer.batch_size=choice(64, 128)",  # the later override of a key wins
        ]
    )
    assert space == {
        "optimizer.lr": FloatDistribution(0.001, 0.5, log=True),
        "model.bn_momentum": FloatDistribution(0.01, 0.3),
        "trainer.batch_size": CategoricalDistribution([64, 128]),
        "trainer.grad_accum": IntDistribution(1, 9, step=4),
        "trainer.seed": IntDistribution(0, 9),
        "regularizer.l2": FloatDistribution(0.0, 0.75, step=0.25),
        "regularizer": CategoricalDistribution(["none", "l2"]),
    }
    assert fixed == ["trainer.epochs=3", "+callbacks.x.a=1"]
    assert first_point(space)["trainer.grad_accum"] == 1
    assert first_point(space)["regularizer"] == "none"

    log_from_0 = "optimizer.lr=tag(log, interval(0, 1))"
    with pytest.raises(ConfigError, match=r"^optimizer\.lr='tag\(.*' is not allowed: `low > 0`"):
        search_space([log_from_0])


def test_trial_parameters_become_overrides_hydra_reads_back() -> None:
    """Values go back through Hydra's own writer: a space in a string, null, floats."""
    params = {"a": "x y", "b": "null", "c": 1e-05, "d": 64, "e": True}
    overrides = overrides_of(params, ["trainer.epochs=1"])
    assert overrides[0] == "trainer.epochs=1"
    back = OverridesParser.create().parse_overrides(overrides[1:])
    assert [o.get_key_element() for o in back] == list(params)
    assert [o.value() for o in back] == ["x y", None, 1e-05, 64, True]


def test_preset_composes_the_optuna_sweeper_and_an_objective_that_ranks() -> None:
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        plain = compose(config_name="config", return_hydra_config=True)
        cfg = compose(
            config_name="config",
            overrides=["hparams_search=digits_optuna"],
            return_hydra_config=True,
        )
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.startswith("hydra_plugins.mnistlab_optuna_sweeper.")
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed == 0 and sweeper.direction is None
    assert set(sweeper.params) == {"optimizer.lr", "trainer.batch_size", "model.bn_momentum"}
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert plain.hydra.sweeper._target_.endswith("BasicSweeper")
    with open_dict(cfg), open_dict(plain):
        del cfg["hydra"], plain["hydra"]
    # val/acc over 144 validation digits ties between trials: the preset minimises val/loss
    assert (cfg.objective.metric, cfg.objective.direction) == ("val/loss", "minimize")
    with open_dict(cfg), open_dict(plain):
        del cfg["objective"], plain["objective"]
    assert cfg == plain  # and leaves the rest of the job config alone


def test_plugin_scan_does_not_load_optuna() -> None:
    """Hydra imports the plugin on every run: Optuna loads only when the sweeper is chosen."""
    code = "import sys, hydra_plugins.mnistlab_optuna_sweeper.optuna_sweeper as m\n"
    code += "print('optuna' in sys.modules, 'mnistlab.sweeps.search' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.slow
def test_search_records_trials_a_failed_one_and_the_best(tmp_path: Path) -> None:
    """Four trials minimizing val/loss; trial 1 raises, the search goes on to trial 3."""
    sweep_dir = tmp_path / "sweep"
    proc = search(
        sweep_dir,
        "hydra/sweeper=optuna",
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.n_trials=4",
        "optimizer.lr=tag(log, interval(0.01, 0.2))",
        "model.bn_momentum=0.3,0.03",
        "objective.metric=val/loss",
        "objective.direction=minimize",
        *override("boom", RaiseInJob, job=JOB_NUM, fail=1),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # a job failed: the sweep says so at the end
    assert "did not complete" in proc.stderr + proc.stdout

    study = load_study(sweep_dir)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    complete, fail = TrialState.COMPLETE, TrialState.FAIL
    assert [t.state for t in study.trials] == [complete, fail, complete, complete]
    assert study.trials[1].user_attrs["error"] == "the job returned nan"
    for t in study.trials:
        s = read_summary(sweep_dir / str(t.number))  # job folders are numbered by trial
        assert s["config"]["optimizer"]["lr"] == t.params["optimizer.lr"]
        assert s["config"]["model"]["bn_momentum"] == t.params["model.bn_momentum"]
        if t.state == TrialState.COMPLETE:
            assert t.value == s["final"]["val/loss"]
        else:
            assert s["status"] == "failed" and "injected fault" in s["error"]

    best = results(sweep_dir)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    best_trial = min(done, key=lambda t: t.value)
    assert best["best_trial"] == best_trial.number
    assert best["best_value"] == best_trial.value == study.best_value
    assert best["best_params"] == best_trial.params
    assert best["trials"] == {"completed": 3, "failed": 1, "interrupted_and_rerun": []}
    assert best["direction"] == "minimize" and best["metric"] == "val/loss"
    assert Path(best["best_job_dir"]) == sweep_dir / str(best_trial.number)
    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    assert [r["status"] for r in rows] == ["completed", "failed", "completed", "completed"]


@pytest.mark.slow
def test_killed_search_resumes_where_it_stopped(tmp_path: Path) -> None:
    """The preset, three trials; the first attempt is killed in trial 1. The same command
    (less the fault: extra callbacks may differ on resume) keeps trial 0, runs trial 1's
    parameters again (as trial 2) in trial 1's folder from its checkpoint, then trial 3, and
    stops. (tests/test_optuna_resume.py stops one search at two other moments.)"""
    sweep_dir = tmp_path / "sweep"
    command = ("hparams_search=digits_optuna", "hydra.sweeper.n_trials=3")
    kill = override("kill", KillInJob, job=JOB_NUM, kill=1, at=5)
    killed = search(sweep_dir, *command, *kill, process=True)
    assert killed.returncode == -9, killed.stderr[-3000:]
    study = load_study(sweep_dir)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert not (sweep_dir / "1" / "summary.json").exists()
    first = sweep_dir / "0" / "summary.json"
    before = (first.read_bytes(), first.stat().st_mtime_ns)
    interrupted = study.trials[1].params

    resumed = search(sweep_dir, *command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = load_study(sweep_dir).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL] + [
        TrialState.COMPLETE
    ] * 2
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before  # trial 0 was not re-run
    assert trials[0].params == study.trials[0].params
    assert trials[2].user_attrs[RETRY_OF] == 1 and trials[2].params == interrupted
    assert read_summary(sweep_dir / "1")["config"]["optimizer"]["lr"] == interrupted["optimizer.lr"]
    assert RETRY_OF not in trials[3].user_attrs
    counts = results(sweep_dir)["trials"]
    assert counts == {"completed": 3, "failed": 0, "interrupted_and_rerun": [1]}
    assert results(sweep_dir)["best_value"] == min(t.value for t in trials if t.value is not None)

    again = search(sweep_dir, *command)  # a finished search: nothing more to run
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(load_study(sweep_dir).trials) == 4
    assert "Launching" not in again.stdout + again.stderr

    other = search(sweep_dir, *command, "trainer.batch_size=64")  # not the stored search
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr[-3000:]
    assert other.stderr.startswith(f"error: hydra.sweep.dir='{sweep_dir}' is not allowed")
    assert "trainer.batch_size" in other.stderr
    assert len(load_study(sweep_dir).trials) == 4
