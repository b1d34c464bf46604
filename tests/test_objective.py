"""The validation split in a run and the sweep objective: what a sweep selects on is a
validation (or training) metric the final summary holds, never a test metric."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mnistlab.config import OBJECTIVES, register
from mnistlab.core.errors import ConfigError
from mnistlab.engine import data
from mnistlab.plan import CONF_DIR, plan_from_overrides
from mnistlab.results import folders

from support import app, assert_one_line_error, read_jsonl, read_summary

QUICK = ("trainer.epochs=2", "dataset.limit_train=500", "trainer.num_threads=1", "logger=none")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["objective.metric=test/acc"], "never optimised"),
        (["objective.metric=train_test_gap"], "never optimised"),
        (["objective.metric=accuracy"], "one of val/acc, val/loss, train_eval/acc"),
        (["objective.metric=train/loss"], "train_eval/loss (train/loss is the running mean"),
        (["dataset.val_size=0"], "dataset.val_size=0 turns the validation split off"),
        (["dataset.val_size=null", "objective.metric=val/acc"], "dataset.val_size=None turns"),
        (["objective.metric=val/loss"], "objective.direction='maximize' is not allowed: minimize"),
        (["objective.direction=minimize"], "maximize for objective.metric=val/acc"),
        (["model.bn=false", "objective.metric=bn/gap_mean"], "model.bn=false"),
        (["dataset.val_size=-1"], "dataset.val_size=-1 is not allowed: a count"),
        (["dataset.val_size=1.5"], "a fraction in (0, 1)"),
        (["dataset.val_size=true"], "dataset.val_size=True"),
        (["dataset.val_size=ten"], "dataset.val_size='ten'"),
        (["dataset.val_size=5"], "a count in [10, 1427]"),  # the data's check, no data read
    ],
)
def test_objective_and_val_size_mistakes_are_one_line(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        plan_from_overrides(overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_default_objective_and_what_turns_the_split_off() -> None:
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config")
    assert (cfg.objective.metric, cfg.objective.direction) == ("val/acc", "maximize")
    assert cfg.dataset.val_size == 0.1
    plan, _ = plan_from_overrides(["dataset.val_size=0", "objective.metric=train_eval/acc"])
    assert plan.num_samples == 1437  # no split: the whole training split
    assert plan_from_overrides([])[0].num_samples == 1293  # 1437 less ceil(143.7)


def test_a_run_evaluates_the_validation_part_and_returns_the_objective(tmp_path: Path) -> None:
    p = app(tmp_path, *QUICK)
    assert p.returncode == 0, p.stderr[-2000:]
    s = read_summary(tmp_path)
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "test/acc" in r]
    assert len(evals) == 2 and all({"val/acc", "val/loss"} <= r.keys() for r in evals)
    final = s["final"]
    assert set(OBJECTIVES) <= final.keys()  # every metric a sweep may optimise is there
    assert not any("test" in m for m in OBJECTIVES)
    assert evals[-1]["val/acc"] == final["val/acc"] and 0.5 < final["val/acc"] <= 1
    # one meaning per name: train/* is the running mean in train mode (step rows only),
    # train_slice/* a test-sized slice in eval mode (evaluation rows), train_eval/* the whole
    # training split in eval mode (the summary's final)
    steps = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert steps and not any("test/acc" in r or "train_slice/acc" in r for r in steps)
    assert all({"train_slice/loss", "train_slice/acc"} <= r.keys() for r in evals)
    assert not any(k.startswith(("train/", "train_slice/")) for k in final)
    assert {"train_eval/loss", "train_eval/acc"} <= final.keys()
    assert f"val/acc {final['val/acc']:.4f}" in p.stdout + p.stderr  # the job's return value
    # the plan's N is the training part, here and in `python -m mnistlab.plan`
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(QUICK))
    assert s["plan"]["num_samples"] == data.train_size(cfg.dataset) == 450
    assert s["accounting_matches_plan"]


def test_sweep_summary_puts_the_objective_beside_status() -> None:
    columns = folders.with_objective(folders.COLUMNS[1:], "val/loss")
    assert columns[:3] == ["overrides", "status", "val/loss"] and columns.count("val/loss") == 1
    rows = [{"val/loss": 0.3, "run": "0"}, {"val/loss": 0.2, "run": "1"}, {"run": "2"}]
    assert folders.best(rows, "val/loss", "minimize")["run"] == "1"  # type: ignore[index]
    assert folders.best(rows, "val/loss", "maximize")["run"] == "0"  # type: ignore[index]
    assert folders.best([{"run": "0", "val/acc": float("nan")}], "val/acc", "maximize") is None


@pytest.mark.slow
def test_sweep_summary_csv_has_the_objective_column(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    p = app(sweep, *QUICK, "optimizer.lr=0.01,0.1", "objective.metric=val/loss",
                "objective.direction=minimize", multirun=True)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    with (sweep / "sweep_summary.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames is not None
    assert reader.fieldnames[1:5] == ["optimizer.lr", "overrides", "status", "val/loss"]
    losses = [read_summary(sweep / str(i))["final"]["val/loss"] for i in (0, 1)]
    assert [float(r["val/loss"]) for r in rows] == losses
    best = min((0, 1), key=lambda i: losses[i])
    assert f"best job by val/loss (minimize): {sweep / str(best)}" in p.stdout + p.stderr


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["optimizer.lr=0.01,0.1", "objective.metric=test/acc"], "never optimised"),
        (["hparams_search=digits_optuna", "objective.metric=accuracy"], "one of val/acc, val/loss"),
    ],
)
def test_a_sweep_checks_its_objective_once_before_any_job(
    tmp_path: Path, overrides: list[str], needle: str
) -> None:
    """A sweep (basic launcher) or a search (Optuna) with a test metric or an unknown name as
    its objective: one error line naming the key, the value and what is allowed, and no job
    folder, trial or study is made."""
    sweep = tmp_path / "sweep"
    p = app(sweep, *QUICK, *overrides, multirun=True)
    line = assert_one_line_error(p, "objective.metric=", needle)
    assert repr(overrides[-1].partition("=")[2]) in line
    assert not sweep.exists()  # no job folder, no sweep_summary.csv, no Optuna journal
