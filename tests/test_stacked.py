"""``hydra/launcher=stacked`` end to end: the real app (in this process), a sweep trained as
one stacked group, each job checked against the same job trained by Hydra's basic launcher."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from mnistlab.engine import checkpoint

from support import app, leet, no_credentials_env, read_jsonl, read_summary, wandb_run_dir

# Small and fast: 1164 digits in the default split would do, 300 are enough; one row per step.
SMALL = (
    "dataset.limit_train=300",
    "trainer.batch_size=16",
    "trainer.epochs=3",
    "trainer.log_every_n_steps=1",
    "trainer.num_threads=1",
    "trainer.progress=none",
)
STACKED = ("hydra/launcher=stacked",)


def sweep(where: Path, *overrides: str, env: dict[str, str] | None = None) -> list[Path]:
    """Run a sweep; its job folders in job order."""
    p = app(where, *overrides, multirun=True, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return sorted((d for d in where.iterdir() if d.name.isdigit()), key=lambda d: int(d.name))


def step_rows(job: Path) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(job / "metrics.jsonl") if "train/loss" in r]


def sweep_statuses(where: Path) -> dict[str, str]:
    with open(where / "sweep_summary.csv") as f:
        return {Path(r["run"]).name: r["status"] for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    """One four-job sweep (two seeds x two rates; L1, L2, dropout, BN's cumulative average),
    by the basic launcher and by the stacked one."""
    tmp = tmp_path_factory.mktemp("pair")
    jobs = ("trainer.seed=0,1", "optimizer.lr=0.05,0.1", "regularizer=elastic",
            "regularizer.dropout=0.2", "model.bn_momentum=null")  # fmt: skip
    basic = sweep(tmp / "basic", *SMALL, "logger=none", *jobs)
    stacked = sweep(tmp / "stacked", *SMALL, "logger=none", *STACKED, *jobs)
    return basic, stacked


def test_each_stacked_job_is_a_job_and_trains_as_it_would_alone(
    pair: tuple[list[Path], list[Path]],
) -> None:
    basic, stacked = pair
    assert len(basic) == len(stacked) == 4
    for alone, job in zip(basic, stacked, strict=True):
        for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", checkpoint.LAST):
            assert (job / name).is_file(), f"{job / name} missing"
        a, s = read_summary(alone), read_summary(job)
        assert (a["launcher"], s["launcher"], s["stacked_jobs"]) == ("basic", "stacked", 4)
        assert s["status"] == "completed" and s["accounting_matches_plan"]
        assert s["counted"] == a["counted"] and s["plan"] == a["plan"]
        assert s["overrides"] == a["overrides"]
        rows_a, rows_s = step_rows(alone), step_rows(job)
        assert [r["optimizer_step"] for r in rows_s] == [r["optimizer_step"] for r in rows_a]
        for ra, rs in zip(rows_a[:50], rows_s[:50], strict=True):  # the first 50 steps
            assert rs["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-4)
        # every row has the same keys: BN points and evaluations at the same steps, and the
        # BN gaps (measured for the whole group in one pass) are the job's own
        all_a, all_s = read_jsonl(alone / "metrics.jsonl"), read_jsonl(job / "metrics.jsonl")
        assert [sorted(r) for r in all_s] == [sorted(r) for r in all_a]
        for ra, rs in zip(all_a, all_s, strict=True):
            for k, v in ra.items():
                if k.startswith("bn/") and isinstance(v, float):
                    assert rs[k] == pytest.approx(v, rel=1e-3, abs=1e-5), (k, ra["optimizer_step"])
        assert s["final"]["val/acc"] == pytest.approx(a["final"]["val/acc"], abs=0.02)


def test_a_stacked_jobs_checkpoint_is_its_own_and_resumes_alone(
    pair: tuple[list[Path], list[Path]], tmp_path: Path
) -> None:
    basic, stacked = pair
    alone, job = basic[3], stacked[3]
    a, s = checkpoint.read(alone / checkpoint.LAST), checkpoint.read(job / checkpoint.LAST)
    # one job's tensors, not the group's storage
    size_a, size_s = (p.stat().st_size for p in (alone / checkpoint.LAST, job / checkpoint.LAST))
    assert abs(size_s - size_a) < 0.1 * size_a, (size_s, size_a)
    assert s["counter"] == a["counter"]
    for key, value in a["model"].items():
        assert value.shape == s["model"][key].shape
        if "running" in key:
            torch.testing.assert_close(s["model"][key], value, rtol=1e-3, atol=1e-4)
    assert s["optimizer"]["state"].keys() == a["optimizer"]["state"].keys()
    # its own random stream: resuming it alone for one more epoch trains on (in a copy: the
    # sweep's folders are the other tests' too)
    job = Path(shutil.copytree(job, tmp_path / "job"))
    p = app(job, "trainer.resume=true", "trainer.epochs=4", "logger=none")
    assert p.returncode == 0, p.stderr[-3000:]
    after = read_summary(job)
    assert after["status"] == "completed" and after["counted"]["epochs"] == 4
    assert (
        after["launcher"] == "basic"
        and after["resumed_from_step"] == s["counter"]["optimizer_steps"]
    )


@pytest.mark.slow
def test_a_diverging_job_stops_alone_and_its_group_trains_on(tmp_path: Path) -> None:
    jobs = ("optimizer.lr=1e10,0.05,0.1", "logger=none")
    for launcher in ((), STACKED):  # a job did not complete: the sweep says so
        where = tmp_path / ("stacked" if launcher else "basic")
        p = app(where, *SMALL, *jobs, *launcher, multirun=True)
        assert p.returncode == 1, p.stderr[-3000:]
    basic = [tmp_path / "basic" / str(i) for i in range(3)]
    assert sweep_statuses(tmp_path / "stacked") == {
        "0": "diverged", "1": "completed", "2": "completed"
    }  # fmt: skip
    stacked = [tmp_path / "stacked" / str(i) for i in range(3)]
    d_a, d_s = read_summary(basic[0]), read_summary(stacked[0])
    assert d_s["diverged_at_step"] == d_a["diverged_at_step"]
    assert d_s["last_checkpoint_step"] == d_a["last_checkpoint_step"]
    for alone, job in zip(basic[1:], stacked[1:], strict=True):
        rows_a, rows_s = step_rows(alone), step_rows(job)
        assert len(rows_a) == len(rows_s)
        for ra, rs in zip(rows_a[:50], rows_s[:50], strict=True):
            assert rs["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-4)


@pytest.mark.slow
def test_jobs_group_by_what_they_share_and_the_rest_run_alone(tmp_path: Path) -> None:
    """Two models make two groups; a cap of 2 splits three seeds into 2 + 1, and the one
    left runs as the basic launcher runs it."""
    jobs = sweep(tmp_path, *SMALL, "trainer.epochs=1", "logger=none", *STACKED,
                 "model=mlp,cnn", "trainer.seed=0,1,2", "hydra.launcher.max_group=2")  # fmt: skip
    got = [(read_summary(j)["config"]["model"]["name"], read_summary(j).get("stacked_jobs", 0))
           for j in jobs]  # fmt: skip
    assert sorted(got) == sorted([("mlp", 2)] * 2 + [("mlp", 0)] + [("cnn", 2)] * 2 +
                                 [("cnn", 0)])  # fmt: skip
    assert all(read_summary(j)["status"] == "completed" for j in jobs)
    assert set(sweep_statuses(tmp_path).values()) == {"completed"}


@pytest.mark.slow
def test_stacked_jobs_have_their_own_wandb_runs(tmp_path: Path) -> None:
    jobs = sweep(tmp_path / "sweep", *SMALL, "trainer.epochs=1", *STACKED, "trainer.seed=0,1",
                 env=no_credentials_env(tmp_path))  # fmt: skip
    ids = set()
    for job in jobs:
        run = wandb_run_dir(job)
        records = leet(run)
        (info,) = [r["run"] for r in records if r["type"] == "run"]
        ids.add(info["run_id"])
        state = leet(run, "--summary")
        assert (state["state"], state["exit_code"]) == ("finished", 0)
        assert state["config"]["trainer"]["seed"] == read_summary(job)["config"]["trainer"]["seed"]
        steps = read_summary(job)["counted"]["total_steps"]
        assert state["summary"]["counted/total_steps"] == steps
    assert len(ids) == 2


def test_compare_cannot_tell_how_the_jobs_trained(pair: tuple[list[Path], list[Path]]) -> None:
    from mnistlab.results import folders

    (cols_a, rows_a), (cols_s, rows_s) = (
        folders.table([jobs[0].parent], sort=None, per_run=True) for jobs in pair
    )
    assert cols_s == cols_a and len(rows_s) == len(rows_a) == 4
    for ra, rs in zip(rows_a, rows_s, strict=True):
        assert rs["overrides"] == ra["overrides"] and rs["status"] == ra["status"]
        assert rs["test/acc"] == pytest.approx(ra["test/acc"], abs=0.02)
