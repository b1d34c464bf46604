"""``python -m mnistlab.compare`` on run folders written by hand (summary.json and
metrics.jsonl as a job writes them): seed groups, extra columns, CSV, several plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mnistlab import compare
from mnistlab.results import aggregate, curves, folders
from mnistlab.results.aggregate import Stat

LRS = ("0.02", "0.1")
SEEDS = (0, 1, 2)
# final test/acc per (lr, seed): arbitrary, unequal spreads
ACC = {("0.02", 0): 0.91, ("0.02", 1): 0.935, ("0.02", 2): 0.902,
       ("0.1", 0): 0.96, ("0.1", 1): 0.948, ("0.1", 2): 0.97}  # fmt: skip


def curve(lr: str, seed: int, steps: int) -> list[dict[str, Any]]:
    """metrics.jsonl rows: a decaying train loss and a test accuracy at every 5th step."""
    rows = []
    for s in range(1, steps + 1):
        row: dict[str, Any] = {"optimizer_step": s, "micro_batch": 2 * s, "epoch": s / 10,
                               "samples_seen": 64 * s}  # fmt: skip
        row["train/loss"] = float(lr) * 10 / s + 0.01 * seed
        if s % 5 == 0:
            row["test/acc"] = ACC.get((lr, seed), 0.1) - 1 / (s + seed)
        rows.append(row)
    return rows


def write_run(
    folder: Path,
    lr: str,
    seed: int,
    status: str = "completed",
    steps: int = 20,
    batch: int = 32,
    objective: tuple[str, str] | None = None,
) -> None:
    """A job's folder; with ``objective`` (metric, direction) it also has a validation split
    whose loss ranks the runs against their test accuracy (val/loss = test/acc)."""
    folder.mkdir(parents=True)
    final = {"test/acc": ACC.get((lr, seed)), "test/loss": 1 - ACC.get((lr, seed), 0.0)}
    if objective is not None:
        final |= {"val/acc": ACC[(lr, seed)] - 0.01, "val/loss": ACC[(lr, seed)]}
    summary = {
        "status": status,
        "plan": {"total_steps": 20, "total_micro_batches": 40, "batch_size": batch},
        "counted": {"total_steps": steps, "total_micro_batches": 2 * steps},
        "final": final if status == "completed" else {},
        "timings": {"wall_s": 1.0 + seed},
        "overrides": ["trainer.epochs=2", f"optimizer.lr={lr}", f"trainer.seed={seed}"],
        "config": {"trainer": {"batch_size": batch, "seed": seed}, "optimizer": {"lr": float(lr)}},
    }
    if status != "completed":
        summary["error"] = "error: loss became nan"
    if objective is not None:
        summary["config"]["objective"] = dict(zip(("metric", "direction"), objective, strict=True))
    (folder / "summary.json").write_text(json.dumps(summary))
    rows = curve(lr, seed, steps)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A sweep folder: optimizer.lr x trainer.seed, job numbers as Hydra gives them."""
    root = tmp_path / "sweep"
    for i, (lr, seed) in enumerate((lr, s) for lr in LRS for s in SEEDS):
        write_run(root / str(i), lr, seed, batch=16 * (i + 1))
    return root


def test_seed_groups_are_mean_std_n_against_numpy(sweep: Path) -> None:
    columns, rows = folders.table([sweep])
    assert columns[:3] == ["run", "optimizer.lr", "trainer.seed"]
    assert [r["optimizer.lr"] for r in rows] == ["0.1", "0.02"]  # sorted by mean test/acc
    for row in rows:
        accs = [ACC[(row["optimizer.lr"], s)] for s in SEEDS]
        cell = row["test/acc"]
        assert isinstance(cell, Stat) and cell.n == 3
        assert cell.mean == pytest.approx(np.mean(accs), abs=1e-15)
        assert cell.std == pytest.approx(np.std(accs, ddof=1), abs=1e-15)
        assert row["trainer.seed"] == "0,1,2" and row["status"] == "completed"
    text = folders.render(columns, rows)
    assert f"{rows[0]['test/acc'].mean:.4g} ± {rows[0]['test/acc'].std:.2g} (3)" in text

    _, per_run = folders.table([sweep], per_run=True)
    assert len(per_run) == 6 and per_run[0]["test/acc"] == max(ACC.values())


def test_validation_beside_test_sorted_by_the_objective(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The runs' own objective sorts the table in its direction, its column beside status,
    validation before test; no validation split or no objective: said once on stderr."""
    assert compare.main([str(sweep)]) == 0  # the fixture's runs: no split, no objective
    out, err = capsys.readouterr()
    assert "val/" not in out.splitlines()[0]
    assert "note: no run has a validation split (dataset.val_size=0)" in err
    assert "note: no objective in the runs' config: sorted by test/acc" in err

    root = tmp_path / "validated"
    for i, (lr, seed) in enumerate((lr, s) for lr in LRS for s in SEEDS):
        write_run(root / str(i), lr, seed, objective=("val/loss", "minimize"))
    assert compare.main([str(root)]) == 0
    out, err = capsys.readouterr()
    header = out.splitlines()[0].split()
    assert header[3:8] == ["status", "val/loss", "val/acc", "test/acc", "bn/gap_mean"]
    assert "note:" not in err
    _, rows = folders.table([root])
    assert [r["optimizer.lr"] for r in rows] == ["0.02", "0.1"]  # by val/loss, lowest first
    _, by_test = folders.table([root], "test/acc")
    assert [r["optimizer.lr"] for r in by_test] == ["0.1", "0.02"]  # test would rank the other way
    _, per_run = folders.table([root], per_run=True)
    losses = [r["val/loss"] for r in per_run]
    assert losses == sorted(losses)

    write_run(root / "6", "0.1", 2, objective=("val/acc", "maximize"))
    notes: list[str] = []
    folders.table([root], notes=notes)
    assert notes == [
        "the runs' objectives differ (val/loss (minimize), val/acc (maximize)): sorted by "
        "val/loss; --sort picks one"
    ]


def test_a_failed_seed_is_counted_out_and_named(sweep: Path) -> None:
    write_run(sweep / "6", "0.1", 3, status="diverged", steps=7)
    _, rows = folders.table([sweep])
    (best,) = [r for r in rows if r["optimizer.lr"] == "0.1"]
    assert best["status"] == "3×completed,diverged" and best["trainer.seed"] == "0,1,2,3"
    assert best["test/acc"].n == 3  # the diverged run has no accuracy to average
    assert best["counted_steps"] == aggregate.stat([20, 20, 20, 7])


def test_csv_has_mean_std_and_n_columns(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "table.csv"
    assert compare.main([str(sweep), "--csv", str(out)]) == 0
    with out.open() as f:
        reader = csv.DictReader(f)
        back = list(reader)
    assert {"test/acc_mean", "test/acc_std", "test/acc_n"} <= set(reader.fieldnames or ())
    assert "test/acc" not in (reader.fieldnames or ())
    for row in back:
        accs = [ACC[(row["optimizer.lr"], s)] for s in SEEDS]
        assert float(row["test/acc_mean"]) == pytest.approx(np.mean(accs), abs=1e-15)
        assert float(row["test/acc_std"]) == pytest.approx(np.std(accs, ddof=1), abs=1e-15)
        assert row["test/acc_n"] == "3"
    assert " ± " in capsys.readouterr().out


def test_one_seed_has_no_spread() -> None:
    assert str(aggregate.stat([0.5])) == "0.5 (1)"
    assert aggregate.stat([None, float("nan"), "x"]) is None
    assert aggregate.merge_text(["a", "a"]) == "a"


def test_series_mean_and_band_against_numpy() -> None:
    """Three runs; the third stopped early: past its end the mean is the other two's."""
    runs = [[(x, 1.0 / x + k) for x in range(1, 11)] for k in (0.0, 0.3)]
    runs.append([(x, 2.0 / x) for x in range(1, 5)])
    xs, mean, std, n = aggregate.series(runs)
    assert xs.tolist() == list(range(1, 11))
    for i, x in enumerate(range(1, 11)):
        ys = [y for run in runs for xx, y in run if xx == x]
        assert n[i] == len(ys)
        assert mean[i] == pytest.approx(np.mean(ys))
        assert std[i] == pytest.approx(np.std(ys, ddof=1))
    alone = aggregate.series([[(1, 2.0)], [(2, 3.0)]])
    assert np.isnan(alone[2]).all() and alone[1].tolist() == [2.0, 3.0]


def test_figure_draws_a_mean_line_and_band_per_seed_group(sweep: Path) -> None:
    fig = curves.figure([sweep], ["train/loss", "test/acc"], x="epoch", logy=True)
    loss_ax, acc_ax = fig.axes
    assert loss_ax.get_yscale() == "log" and loss_ax.get_ylabel() == "train/loss"
    assert acc_ax.get_xlabel() == "epoch"
    lines = loss_ax.get_lines()
    assert [ln.get_label() for ln in lines] == ["optimizer.lr=0.02 (3 seeds)",
                                                 "optimizer.lr=0.1 (3 seeds)"]  # fmt: skip
    for line, lr in zip(lines, LRS, strict=True):
        losses = np.array([[r["train/loss"] for r in curve(lr, s, 20)] for s in SEEDS])
        x, y = line.get_xydata().T
        assert x.tolist() == pytest.approx([s / 10 for s in range(1, 21)])
        assert y.tolist() == pytest.approx(losses.mean(axis=0).tolist())
    band = loss_ax.collections[0].get_paths()[0].vertices[:, 1]
    losses = np.array([[r["train/loss"] for r in curve("0.02", s, 20)] for s in SEEDS])
    mean, std = losses.mean(axis=0), losses.std(axis=0, ddof=1)
    assert band.max() == pytest.approx((mean + std).max())
    assert band.min() == pytest.approx((mean - std).min())
    assert len(acc_ax.get_lines()[0].get_xydata()) == 4  # test/acc every 5th step

    per_run = curves.figure([sweep], ["train/loss"], per_run=True)
    assert len(per_run.axes[0].get_lines()) == 6 and not per_run.axes[0].collections


def test_several_plots_one_png_and_unknown_metric(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "both.png"
    args = [str(sweep), "--plot", "train/loss", "--plot", "test/acc", "--logy", "--out", str(png)]
    assert compare.main(args) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert curves.plot([sweep], ["train/loss", "test/acc"]).name == "train_loss+test_acc.png"
    capsys.readouterr()
    assert compare.main([str(sweep), "--plot", "val/acc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run logged it" in err and "train/loss" in err


def test_config_and_summary_values_as_columns_and_sort_keys(
    sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cols = ["trainer.batch_size", "counted/total_micro_batches"]
    columns, rows = folders.table([sweep], "trainer.batch_size", True, cols, per_run=True)
    assert columns[-2:] == cols
    assert [r["trainer.batch_size"] for r in rows] == [16, 32, 48, 64, 80, 96]
    assert {r["counted/total_micro_batches"] for r in rows} == {40}
    assert compare.main([str(sweep), "--runs", "--col", "trainer.batch_size"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[-1] == "trainer.batch_size"

    assert compare.main([str(sweep), "--col", "trainer.batchsize"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: --col 'trainer.batchsize' is not a column; did you mean:")
    assert "trainer.batch_size" in err
    assert compare.main([str(sweep), "--sort", "zzz"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trainer.batch_size" in err and "test/acc" in err


def test_unreadable_runs_are_skipped_with_one_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A damaged summary.json or a half-written metrics line hides nothing else."""
    good, broken = tmp_path / "0", tmp_path / "1"
    for run in (good, broken):
        run.mkdir()
    (good / "summary.json").write_text(
        json.dumps({"status": "completed", "final": {"test/acc": 0.9}})
    )
    (good / "metrics.jsonl").write_text('{"optimizer_step": 1, "train/loss": 2.0}\n{"optimizer_st')
    (broken / "summary.json").write_text('{"status": "compl')
    assert compare.main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "0.9" in out and "completed" in out
    assert err.count("warning: skipping") == 1 and str(broken) in err
    assert folders.read_metrics(good) == [{"optimizer_step": 1, "train/loss": 2.0}]
    assert "skipped 1 unreadable line" in capsys.readouterr().err
