"""report.py, series.py, pictures.py: the data each picture draws is the run's own, and the
pictures, pages and tables come out of real runs and sweeps."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from mnistlab import report
from mnistlab.engine import loop
from mnistlab.engine.steps import StepPlan
from mnistlab.results import pictures, reports, series

from support import ROOT, TorchThreads, app, png_size, read_jsonl, read_summary


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one torch thread each test (see ``support.TorchThreads``)."""
    with TorchThreads(1):
        yield


PLANS = [
    StepPlan(1437, 2, 32, 1, 1, False),  # the default: a short last micro-batch
    StepPlan(1000, 2, 16, 3, 4, False),  # padding on ranks 1 and 2, a short last window
    StepPlan(1000, 2, 16, 3, 4, True),  # the sampler drops 1, each rank a short micro-batch
    StepPlan(100, 1, 8, 7, 3, False),  # padding on most ranks
]


def assert_pngs(folder: Path, names: list[str]) -> None:
    for name in names:
        width, height = png_size(folder / name)
        assert 500 <= width <= 4000 and 250 <= height <= 3000, (name, width, height)


# ----------------------------------------------------------------------------- step accounting


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"w{p.world_size}a{p.grad_accum}")
def test_epoch_layout_is_what_the_loop_runs(plan: StepPlan) -> None:
    """Per rank, the drawn micro-batches and windows are the loop's own, padding is the tail
    of the shard repeating the sampler's head, and drop_last's cut is what the loop skips."""
    layout = series.epoch_layout(plan)
    assert [r.rank for r in layout] == list(range(plan.world_size))
    head = torch.randperm(plan.num_samples, generator=torch.Generator().manual_seed(5))
    tails = []
    for r in layout:
        order = loop.epoch_order(plan, seed=5, epoch=0, rank=r.rank)
        batches = loop.micro_batches(order, plan)
        windows = list(loop.windows(batches, plan.grad_accum))
        assert [[len(b) for b in w] for w in windows] == r.windows
        assert [len(w) for w in r.windows] == plan.window_sizes()
        assert r.dropped_tail == len(order) - sum(len(b) for b in batches)
        tails.append(order[len(order) - r.padding :])
    repeated = torch.cat(tails).sort().values  # what the tails hold: the head, once over
    assert torch.equal(repeated, head[: plan.padding].sort().values)
    assert sum(r.padding for r in layout) == plan.padding


@pytest.mark.parametrize("plan", [*PLANS, StepPlan(60000, 1, 64, 16, 2, False)])
def test_drawn_windows_are_the_plans(plan: StepPlan) -> None:
    fig = pictures.draw_epoch(series.epoch_layout(plan), plan.batch_size, series.plan_lines(plan))
    ax = fig.axes[0]
    drawn = [p for p in ax.patches if p.get_gid() == "window"]
    ranks, _ = series.shown(plan.world_size, pictures.MAX_RANKS, pictures.HEAD_RANKS)
    index, left = series.shown(plan.steps_per_epoch, pictures.MAX_WINDOWS, pictures.HEAD_WINDOWS)
    assert len(drawn) == len(ranks) * len(index)
    assert len(index) + left == plan.steps_per_epoch
    # each window's width is its samples over the batch size: the short last one shows
    widths = [p.get_width() for p in drawn[: len(index)]]
    last = series.epoch_layout(plan)[0].windows[-1]
    assert widths[-1] == pytest.approx(sum(last) / plan.batch_size)
    padded = [p for p in ax.patches if p.get_gid() == "padding"]
    shown_padding = sum(series.epoch_layout(plan)[r].padding > 0 for r in ranks)
    assert len(padded) == shown_padding
    assert bool([p for p in ax.patches if p.get_gid() == "dropped"]) == plan.drop_last


def test_plan_round_trips_through_the_summary() -> None:
    plan = StepPlan(1000, 3, 16, 3, 4, True)
    summary = json.loads(json.dumps({"plan": plan.as_dict()}))
    assert series.plan_of(summary) == plan
    lines = series.plan_lines(plan, {"total_steps": plan.total_steps + 1})
    assert any("DIFFERS" in line for line in lines)
    assert any(f"{plan.textbook_steps:.6g}" in line for line in lines)


def test_weight_histogram_keeps_exact_zeros_apart() -> None:
    w = np.array([0.0, 0.0, 0.0, 1e-9, -0.5, 0.25, 0.5])
    h = series.weight_histogram(w, bins=5)
    assert h.zeros == 3 and int(h.counts.sum()) == 4 and h.total == len(w)
    assert h.edges[0] == -0.5 and h.edges[-1] == 0.5


# ----------------------------------------------------------------------------- the table


def _fake_run(folder: Path, overrides: list[str], final: dict, threads: int = 1) -> Path:
    folder.mkdir(parents=True)
    summary = {"status": "completed", "overrides": overrides, "final": final}
    summary |= {"num_threads": threads, "config": {"regularizer": {"l1": 0.02}}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_markdown_table_formats_finals_and_dotted_keys(tmp_path: Path) -> None:
    a = _fake_run(tmp_path / "0", ["regularizer=none", "x=1"], {"test/acc": 0.98891, "n": 3})
    b = _fake_run(tmp_path / "1", ["regularizer=l1", "x=1"], {"weights/sparsity_exact": 0.5051})
    runs = [reports.Run.load(p) for p in (a, b)]
    lines = reports.markdown_table(runs).splitlines()
    assert lines[0].startswith("| regularizer | test acc |") and "x" not in lines[0].split("|")
    assert lines[2].startswith("| none | 0.9889 |") and lines[3].startswith("| l1 | - |")
    assert "50.5%" in lines[3]
    custom = reports.markdown_table(runs, ["n", "config.regularizer.l1"]).splitlines()
    assert custom[0] == "| regularizer | n | config.regularizer.l1 |"
    assert custom[2] == "| none | 3 | 0.02 |"
    with pytest.raises(reports.ReportError, match="'nope': no run has it"):
        reports.markdown_table(runs, ["nope"])

    # with a validation split: its columns before test's, rows best first by the objective
    objective = {"metric": "val/loss", "direction": "minimize"}
    for i, loss in enumerate((0.3, 0.1, 0.2)):
        run = _fake_run(tmp_path / f"v{i}", [f"lr={i}"], {"val/loss": loss, "test/acc": 1 - i / 10})
        summary = json.loads((run / "summary.json").read_text())
        summary["config"]["objective"] = objective
        (run / "summary.json").write_text(json.dumps(summary))
    runs = [reports.Run.load(tmp_path / f"v{i}") for i in range(3)]
    lines = reports.markdown_table(runs).splitlines()
    assert lines[0].startswith("| lr | val loss | test acc |")
    assert [ln.split(" | ")[0] for ln in lines[2:]] == ["| 1", "| 2", "| 0"]  # lowest val/loss


def test_table_goes_between_the_markers(tmp_path: Path) -> None:
    _fake_run(tmp_path / "s" / "0", ["regularizer=none"], {"test/acc": 0.5})
    _fake_run(tmp_path / "s" / "1", ["regularizer=l2"], {"test/acc": 0.75})
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- report:reg -->\nold\n<!-- /report:reg -->\nafter\n")
    args = [str(tmp_path / "s"), "--table", "--into", str(readme), "--block", "reg"]
    assert report.main(args) == 0
    text = readme.read_text()
    assert text.startswith("intro\n<!-- report:reg -->\n| regularizer |")
    assert "old" not in text and text.endswith("<!-- /report:reg -->\nafter\n")
    assert "| l2 | 0.7500 |" in text
    assert f"Made by `python -m mnistlab.report {' '.join(args)}` on commit" in text
    assert "1 torch thread(s) per run" in text and reports.cpu_model() in text
    assert report.main(args) == 0 and readme.read_text() == text  # rerunning changes nothing


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/missing"], "does not exist"),
        (["{tmp}/empty"], "no run folders"),
        (["{run}", "--table", "--columns", "test/acc,nope"], "'nope': no run has it"),
        (["{run}", "--into", "{tmp}/README.md"], "--into needs --table"),
        (["{run}", "--table", "--into", "{tmp}/none.md"], "cannot be read"),
    ],
)
def test_user_errors_are_one_line(
    tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _fake_run(tmp_path / "runs" / "0", ["a=1"], {"test/acc": 0.5})
    (tmp_path / "empty").mkdir()
    assert report.main([a.format(tmp=tmp_path, run=run) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_the_command_exits_2_without_a_traceback(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "mnistlab.report", str(tmp_path / "missing")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path / 'missing'} does not exist\n"


# ----------------------------------------------------------------------------- real runs

TINY = ("logger=none", "trainer.progress=none", "dataset.limit_train=400", "trainer.num_threads=1")


@pytest.mark.slow
def test_report_true_writes_the_pictures_of_a_real_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    extra = ("trainer.epochs=2", "report=true", "regularizer=l1", "bn_stats.recalibrate=true")
    proc = app(run, *TINY, *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary, rows = read_summary(run), read_jsonl(run / "metrics.jsonl")
    assert summary["timings"]["report_s"] > 0
    names = ["learning.png", "steps.png", "regularization.png", "bn.png"]
    assert_pngs(run / "report", names)
    page = (run / "report" / "report.md").read_text()
    assert all(f"({n})" in page for n in names) and "status **completed**" in page
    # the plotted BN series are the logged values, in the logged order
    bn = series.bn_series(rows)
    assert set(bn) == set(summary["bn"])
    for layer, metrics in bn.items():
        for metric, points in metrics.items():
            key = f"bn/{layer}/{metric}"
            assert points.y == [r[key] for r in rows if key in r]
            assert points.x == [r["optimizer_step"] for r in rows if key in r]
    fig = pictures.draw_bn(bn, series.recalibration(rows, summary))
    first = next(iter(bn))
    assert list(fig.axes[0].lines[0].get_ydata()) == bn[first]["mean_gap_mean"].y
    # PreciseBN's before/after are the summary's
    recal = series.recalibration(rows, summary)
    assert recal is not None
    assert recal.gap_after == summary["final"]["bn/gap_mean_after_recal"]
    assert recal.acc_before == summary["final"]["bn/test_acc_before_recal"]
    # the histogram's weights are the ones the run's weight metrics counted
    w = series.regularized_weights(run / "checkpoints" / "last.pt")
    assert len(w) == summary["final"]["weights/count"]
    assert (w == 0).mean() == pytest.approx(summary["final"]["weights/sparsity_exact"])
    assert np.sqrt((w**2).sum()) == pytest.approx(summary["final"]["weights/l2_norm"], rel=1e-5)


@pytest.mark.slow
def test_a_failing_report_costs_a_warning_not_the_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "report").write_text("a file where the report folder should go")
    proc = app(run, *TINY, "trainer.epochs=1", "report=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_summary(run)["status"] == "completed"
    output = (proc.stdout + proc.stderr).splitlines()  # Hydra logs to stdout
    warnings = [ln for ln in output if "report not written" in ln]
    assert len(warnings) == 1 and "python -m mnistlab.report" in warnings[0]


@pytest.mark.slow
def test_sweep_reports_momenta_steps_and_regularizers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bn_sweep, mixed = tmp_path / "bn", tmp_path / "mixed"
    proc = app(bn_sweep, *TINY, "trainer.epochs=2", "model.bn_momentum=0.1,null", multirun=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grid = ("regularizer=none,l1", "trainer.grad_accum=1,2", "trainer.epochs=1")
    proc = app(mixed, *TINY, *grid, multirun=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for args in ([str(bn_sweep), "--each"], [str(mixed)]):  # --each: every job's report too
        assert report.main(args) == 0, capsys.readouterr().err[-2000:]
    assert_pngs(bn_sweep / "report", ["bn_momentum.png", "accuracy.png"])
    assert not (bn_sweep / "report" / "steps.png").exists()  # one batch shape: nothing to compare
    assert_pngs(mixed / "report", ["steps.png", "regularization.png", "accuracy.png"])
    assert not (mixed / "0" / "report").exists()  # without --each, the sweep's page only
    for job in ("0", "1"):
        assert_pngs(bn_sweep / job / "report", ["learning.png", "steps.png", "bn.png"])
    page = (bn_sweep / "report" / "report.md").read_text()
    assert "| model.bn_momentum | val acc | val loss | test acc |" in page  # validation first
    assert "[model.bn_momentum=null](../1/report/report.md)" in page
    # the sweep's step bars are each job's plan
    runs = [reports.Run.load(mixed / str(i)) for i in range(4)]
    jobs = [series.job_steps("", r.summary) for r in runs]
    assert [j.steps for j in jobs] == [r.summary["counted"]["total_steps"] for r in runs]
    assert [j.micro_batches for j in jobs] == [
        r.summary["plan"]["total_micro_batches"] for r in runs
    ]
    # the table: one row per job, its value from its summary
    capsys.readouterr()
    assert report.main([str(bn_sweep), "--table"]) == 0
    body = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")][1:]
    finals = {j: read_summary(bn_sweep / j)["final"] for j in ("0", "1")}
    best_first = sorted(finals, key=lambda j: -finals[j]["val/acc"])  # the objective, maximize
    for column, key in ((1, "val/acc"), (3, "test/acc")):
        cells = [f"{finals[j][key]:.4f}" for j in best_first]
        assert [ln.split(" | ")[column] for ln in body] == cells
