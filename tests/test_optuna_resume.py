"""An Optuna search stopped and run again resumes as if it had never stopped: no parameter set
drawn twice, the interrupted trial continues in its own folder, the search exits 0 once
``n_trials`` trials finished, ``optimization_results.yaml`` agrees with the stored study, and
the command the stop message prints is the command that resumes it. Stopped at two moments:
SIGKILL inside a trial (nothing handled) and SIGTERM inside another (the run checkpoints and
the sweep stops)."""

from __future__ import annotations

import csv
import signal
import subprocess
from pathlib import Path
from typing import Any

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from mnistlab.sweeps.search import JOURNAL, RESULTS, RETRY_OF

from faults import KillInJob, SignalInJob, override
from support import app, read_summary, run_app

pytestmark = pytest.mark.slow

TRIALS = 5
COMMAND = (
    "hparams_search=digits_optuna",
    f"hydra.sweeper.n_trials={TRIALS}",
    "dataset.limit_train=400",
    "trainer.epochs=2",
    "trainer.num_threads=1",
    "logger=none",
    "trainer.progress=none",
)
JOB_NUM = "${hydra:job.num}"


def search(sweep_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """A search its fault kills or stops: in its own process."""
    return run_app(sweep_dir, *COMMAND, *extra, multirun=True, timeout=300)


def search_here(sweep_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """A search that runs to its end: in this process, as ``python -m mnistlab.train``."""
    return app(sweep_dir, *COMMAND, *extra, multirun=True)


def trials(sweep_dir: Path) -> list[optuna.trial.FrozenTrial]:
    storage = JournalStorage(JournalFileBackend(str(sweep_dir / JOURNAL)))
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage).trials


def results(sweep_dir: Path) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(sweep_dir / RESULTS))  # type: ignore[return-value]


def points(ts: list[optuna.trial.FrozenTrial]) -> list[tuple[Any, ...]]:
    """Each trial's parameters, a re-run left out (it re-runs its trial's point on purpose)."""
    return [tuple(sorted(t.params.items())) for t in ts if RETRY_OF not in t.user_attrs]


@pytest.fixture(scope="module")
def stopped_twice(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One search: killed (SIGKILL) in trial 1, resumed and stopped (SIGTERM) in trial 3,
    resumed with the command the stop message printed, then run once more."""
    sweep_dir = tmp_path_factory.mktemp("search") / "sweep"
    out: dict[str, Any] = {"dir": sweep_dir}
    out["killed"] = search(sweep_dir, *override("f", KillInJob, job=JOB_NUM, kill=1, at=3))
    out["after_kill"] = trials(sweep_dir)
    out["stopped"] = search(sweep_dir, *override("f", SignalInJob, job=JOB_NUM, stop=3, at=3))
    out["after_stop"] = trials(sweep_dir)
    out["resumed"] = search_here(sweep_dir, "trainer.resume=true")  # as the stop message says
    out["final"] = trials(sweep_dir)
    out["again"] = search_here(sweep_dir)
    return out


def test_each_stop_ends_as_its_signal_says(stopped_twice: dict[str, Any]) -> None:
    killed, stopped = stopped_twice["killed"], stopped_twice["stopped"]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [t.state for t in stopped_twice["after_kill"]] == [
        TrialState.COMPLETE,
        TrialState.RUNNING,
    ]
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "trainer.resume=true" in stopped.stderr  # the command that resumes it: tested below


def test_the_resumed_search_finishes_with_exit_0(stopped_twice: dict[str, Any]) -> None:
    resumed = stopped_twice["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = stopped_twice["final"]
    done = [t for t in final if t.state == TrialState.COMPLETE]
    assert len(done) == TRIALS
    again = stopped_twice["again"]
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Launching" not in again.stdout + again.stderr  # nothing more to run
    assert len(trials(stopped_twice["dir"])) == len(final)


def test_no_point_is_drawn_twice(stopped_twice: dict[str, Any]) -> None:
    drawn = points(stopped_twice["final"])
    assert len(set(drawn)) == len(drawn), drawn


def test_an_interrupted_trial_continues_in_its_own_folder(stopped_twice: dict[str, Any]) -> None:
    sweep_dir, final = stopped_twice["dir"], stopped_twice["final"]
    reruns = {int(t.user_attrs[RETRY_OF]): t for t in final if RETRY_OF in t.user_attrs}
    assert sorted(reruns) == [1, 3]
    for number, rerun in reruns.items():
        assert rerun.state == TrialState.COMPLETE
        assert rerun.params == final[number].params and final[number].state == TrialState.FAIL
        assert Path(rerun.user_attrs["job_dir"]) == sweep_dir / str(number)
        summary = read_summary(sweep_dir / str(number))
        assert summary["status"] == "completed" and "resumed_from_step" in summary
        assert summary["config"]["optimizer"]["lr"] == rerun.params["optimizer.lr"]
    folders = sorted(int(p.name) for p in sweep_dir.iterdir() if p.name.isdigit())
    counted = [t for t in final if t.state == TrialState.COMPLETE]
    assert folders == sorted(int(t.user_attrs.get(RETRY_OF, t.number)) for t in counted)
    assert len(folders) == TRIALS  # one folder a counted trial: none left half-done
    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    assert [r["status"] for r in rows] == ["completed"] * TRIALS


def test_results_agree_with_the_stored_study(stopped_twice: dict[str, Any]) -> None:
    sweep_dir, final = stopped_twice["dir"], stopped_twice["final"]
    counts = results(sweep_dir)["trials"]
    failed_in_study = sum(t.state == TrialState.FAIL for t in final)
    assert counts["completed"] == TRIALS and counts["failed"] == 0
    assert failed_in_study == counts["failed"] + len(counts["interrupted_and_rerun"])
    assert counts["interrupted_and_rerun"] == [1, 3]
    best = min((t for t in final if t.value is not None), key=lambda t: t.value)  # val/loss
    assert results(sweep_dir)["best_value"] == best.value
