"""What a Lightning-Hydra-Template user expects: gradient clipping, ``checkpoints/best.pt``
and early stopping, for a single run and per job of a stacked sweep (docs/checkpoints.md)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mnistlab.app.evaluation import evaluate_run
from mnistlab.config.schema import EVALUATED
from mnistlab.core.errors import StoppedEarly
from mnistlab.engine import checkpoint
from mnistlab.engine.best import Best
from mnistlab.engine.checkpoint import Checkpointer
from mnistlab.engine.data import Split
from mnistlab.engine.loop import Loop, LoopConfig, Running
from mnistlab.engine.regularizers import Regularizer
from mnistlab.engine.steps import Cadence, StepCounter, StepPlan
from mnistlab.eval import main as eval_main
from mnistlab.logger.sinks import Sinks

from support import app, assert_one_line_error, read_jsonl, read_summary

SMALL = ("logger=none", "trainer.num_threads=1", "trainer.progress=none",
         "trainer.log_every_n_steps=1")  # fmt: skip
# Every evaluation after the first fails to improve val/acc by more than 1: stops at epoch 2.
STALL = ("trainer.early_stopping.patience=1", "trainer.early_stopping.min_delta=1.0")
CLIP = "trainer.grad_clip_norm=0.3"


# --- gradient clipping, in the loop itself ----------------------------------------------------


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def loop_fit(model: nn.Module, plan: StepPlan, split: Split, **clip: float) -> StepCounter:
    """The real loop, plain SGD at rate 1 (an update is minus the clipped gradient)."""
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    cfg = LoopConfig(seed=0, cadence=Cadence.of(plan.total_steps), **clip)  # type: ignore[arg-type]
    return Loop(model, opt, Regularizer([]), plan, split, split, Sinks(), cfg).fit().counter


def data(n: int) -> Split:
    g = torch.Generator().manual_seed(1)
    return Split(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


@pytest.mark.parametrize("kind", ["grad_clip_norm", "grad_clip_value"])
def test_a_step_clips_the_windows_gradient_once_as_torch_does(kind: str) -> None:
    """One window of two micro-batches: the update is torch's clip of the window's mean
    gradient. Clipping each micro-batch instead gives another update (of twice the norm)."""
    split, limit = data(16), 0.01
    model, ref = mlp(), mlp()
    plan = StepPlan(16, 1, 8, 1, 2, drop_last=False)  # one step of two micro-batches
    assert loop_fit(model, plan, split, **{kind: limit}).optimizer_steps == 1

    start = [p.detach().clone() for p in ref.parameters()]
    nn.functional.cross_entropy(ref(split.x), split.y).backward()
    clip = getattr(nn.utils, f"{kind.replace('grad_clip', 'clip_grad')}_")  # torch's own
    clip(list(ref.parameters()), limit)
    for p, r, s in zip(model.parameters(), ref.parameters(), start, strict=True):
        assert r.grad is not None
        torch.testing.assert_close(p.detach(), s - r.grad, rtol=1e-5, atol=1e-7)
    if kind == "grad_clip_norm":  # the whole update has the clip's norm: clipped once
        moved = torch.cat(
            [(p.detach() - s).flatten() for p, s in zip(model.parameters(), start, strict=True)]
        )
        assert float(moved.norm()) == pytest.approx(limit, rel=1e-4)


def test_accumulated_steps_clip_as_the_unaccumulated_run_of_the_same_batch() -> None:
    """Batch 4 x accumulation 2 and batch 8 take the same windows (no BN, no dropout): with
    clipping on, the same weights after two epochs."""
    split = data(40)
    a, b = mlp(), mlp()
    loop_fit(a, StepPlan(40, 2, 4, 1, 2, drop_last=False), split, grad_clip_norm=0.05)
    loop_fit(b, StepPlan(40, 2, 8, 1, 1, drop_last=False), split, grad_clip_norm=0.05)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


# --- the objective's tracker, with a real checkpointer ----------------------------------------


def test_best_saves_on_improvement_counts_patience_and_resumes_its_state(tmp_path: Path) -> None:
    """train_eval/loss is read from the evaluation row's train_slice/loss; any improvement writes
    best.pt, only one by more than min_delta resets the patience."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(tmp_path, model, opt, {}, None)
    best = Best(ckpt, "train_eval/loss", EVALUATED["train_eval/loss"], False, 2, min_delta=0.1)
    run, counter = Running.zeros(torch.device("cpu")), StepCounter()

    def evaluation(loss: float) -> None:
        counter.optimizer_steps += 10
        counter.epochs += 1
        best.on_evaluation(counter, run, {"train_slice/loss": loss, "val/loss": 0.0})
        ckpt.save(counter, run.as_dict())
        best.on_epoch_end(counter, run)

    evaluation(1.0)  # the first always improves
    evaluation(0.95)  # better, by less than min_delta: best.pt, and one evaluation waited
    assert best.record() == {"metric": "train_eval/loss", "value": 0.95, "step": 20, "epoch": 2,
                             "path": str(tmp_path / checkpoint.BEST)}  # fmt: skip
    assert checkpoint.read(tmp_path / checkpoint.BEST)["counter"]["optimizer_steps"] == 20
    with pytest.raises(StoppedEarly) as stop:
        evaluation(0.97)  # worse: the second in a row, the run stops at this epoch's end
    assert (stop.value.step, stop.value.epoch) == (30, 3)
    assert checkpoint.read(tmp_path / checkpoint.BEST)["counter"]["optimizer_steps"] == 20

    saved = checkpoint.read(tmp_path / checkpoint.LAST)["extra"]["best"]
    again = Best(ckpt, "train_eval/loss", "train_slice/loss", False, 2, 0.1, saved)
    assert again.state == best.state and again.state.stopped is not None
    other = Best(ckpt, "val/loss", "val/loss", False, 2, 0.1, saved)  # another objective
    assert other.record() is None and other.state.stopped is None


# --- the app: a run that stalls, its best.pt, eval --ckpt best, resume -------------------------


@pytest.fixture(scope="module")
def stalled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("stalled") / "run"
    p = app(run, *SMALL, *STALL, CLIP, "trainer.epochs=4")
    assert p.returncode == 0, p.stderr[-3000:]
    return run


def evaluations(run: Path) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if "val/acc" in r]


def test_a_stalled_run_stops_early_completed_with_matching_accounting(stalled: Path) -> None:
    s = read_summary(stalled)
    assert s["status"] == "completed" and s["accounting_matches_plan"] and not s["mismatches"]
    steps_per_epoch = s["plan"]["steps_per_epoch"]
    stop = s["stopped_early"]
    assert (stop["epoch"], stop["step"], stop["planned_epochs"]) == (2, 2 * steps_per_epoch, 4)
    assert "val/acc did not improve by more than 1" in stop["reason"]
    assert s["counted"]["epochs"] == s["plan"]["epochs"] == 2
    assert s["counted"]["total_steps"] == s["plan"]["total_steps"] == 2 * steps_per_epoch
    assert [r["optimizer_step"] for r in evaluations(stalled)] == [steps_per_epoch, stop["step"]]
    assert {"val/acc", "test/acc", "train_eval/acc"} <= s["final"].keys()  # as at a normal end


def test_best_pt_holds_the_best_evaluations_weights(stalled: Path) -> None:
    s, rows = read_summary(stalled), evaluations(stalled)
    top = max(rows, key=lambda r: r["val/acc"])  # the first of equals: a tie never improves
    assert s["best"] == {"metric": "val/acc", "value": top["val/acc"], "epoch": top["epoch"],
                         "step": top["optimizer_step"],
                         "path": str(stalled / checkpoint.BEST)}  # fmt: skip
    state = checkpoint.read(stalled / checkpoint.BEST)  # the digest checked
    assert state["counter"]["optimizer_steps"] == top["optimizer_step"]
    result, _ = evaluate_run(stalled, ["trainer.num_threads=1"], "best")
    assert result["metrics"]["val/acc"] == top["val/acc"]
    assert result["checkpoint"] == str(stalled / checkpoint.BEST)


def test_eval_ckpt_best_writes_its_own_report(stalled: Path, capsys: pytest.CaptureFixture) -> None:
    assert eval_main([str(stalled), "--ckpt", "best", "trainer.num_threads=1"]) == 0
    assert (stalled / "eval_best.json").is_file()
    assert f"wrote {stalled / 'eval_best.json'}" in capsys.readouterr().out


def test_a_run_that_stopped_early_resumes_as_stopped(stalled: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(stalled, tmp_path / "run"))
    before = read_summary(run)
    rows = (run / "metrics.jsonl").read_text().splitlines()
    p = app(run, *SMALL, "trainer.resume=true", "trainer.epochs=6")
    assert p.returncode == 0, p.stderr[-3000:]
    after = read_summary(run)
    assert after["status"] == "completed" and after["accounting_matches_plan"]
    assert after["counted"] == before["counted"] and after["stopped_early"]["epoch"] == 2
    assert after["best"] == {**before["best"], "path": str(run / checkpoint.BEST)}
    trained = [r for r in (run / "metrics.jsonl").read_text().splitlines() if "train/loss" in r]
    assert trained == [r for r in rows if "train/loss" in r]  # no step trained again


def test_an_objective_only_the_end_measures_gets_best_pt_at_the_end(tmp_path: Path) -> None:
    run = tmp_path / "run"
    over = ("objective.metric=weights/l1_norm", "objective.direction=minimize")
    assert app(run, *SMALL, *over, "trainer.epochs=1").returncode == 0
    s = read_summary(run)
    assert s["best"]["value"] == s["final"]["weights/l1_norm"]
    assert s["best"]["step"] == s["counted"]["total_steps"]
    assert (run / checkpoint.BEST).read_bytes() == (run / checkpoint.LAST).read_bytes()
    p = app(tmp_path / "no", *SMALL, *over, "trainer.early_stopping.patience=2")
    assert_one_line_error(p, "trainer.early_stopping.patience=2", "weights/l1_norm")


@pytest.mark.parametrize(
    "override",
    ["trainer.grad_clip_norm=0", "trainer.grad_clip_value=-1",
     "trainer.early_stopping.patience=0", "trainer.early_stopping.min_delta=-0.1"],
)  # fmt: skip
def test_out_of_range_keys_are_one_line_errors(override: str, tmp_path: Path) -> None:
    assert_one_line_error(app(tmp_path, *SMALL, override), override)


# --- the stacked launcher: each lane clips and stops as its job alone -------------------------


@pytest.fixture(scope="module")
def stacked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The stalled job alone, and a stacked sweep of it beside the same job without early
    stopping (three epochs, clipping active in both)."""
    tmp = tmp_path_factory.mktemp("stacked")
    over = (*SMALL, CLIP, "trainer.early_stopping.min_delta=1.0", "trainer.epochs=3")
    assert app(tmp / "alone", *over, "trainer.early_stopping.patience=1").returncode == 0
    assert app(tmp / "unclipped", *SMALL, "trainer.epochs=1").returncode == 0
    p = app(tmp / "sweep", *over, "hydra/launcher=stacked",
            "trainer.early_stopping.patience=1,null", multirun=True)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp / "alone", [tmp / "sweep" / "0", tmp / "sweep" / "1"]


def step_losses(run: Path) -> list[float]:
    return [r["train/loss"] for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r]


def test_a_stacked_lane_clips_and_stops_early_as_its_job_alone(
    stacked: tuple[Path, list[Path]],
) -> None:
    alone, (stopping, going_on) = stacked
    a, s, g = read_summary(alone), read_summary(stopping), read_summary(going_on)
    assert s["stacked_jobs"] == g["stacked_jobs"] == 2
    assert s["stopped_early"]["step"] == a["stopped_early"]["step"]
    assert s["counted"] == a["counted"] and s["accounting_matches_plan"]
    assert s["best"]["step"] == a["best"]["step"]
    losses = step_losses(alone)
    assert losses[7] > step_losses(alone.parent / "unclipped")[7] + 0.1  # clipping is active
    assert step_losses(stopping) == pytest.approx(losses, rel=1e-4)
    assert step_losses(going_on)[: len(losses)] == pytest.approx(losses, rel=1e-4)
    assert s["final"]["test/acc"] == pytest.approx(a["final"]["test/acc"], abs=1e-6)
    # the lane that went on trained all its epochs, alone after the other stopped
    assert "stopped_early" not in g and g["accounting_matches_plan"]
    assert g["counted"]["epochs"] == 3


def test_a_resumed_sweep_skips_the_job_that_stopped_early(
    stacked: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    _, (stopping, _) = stacked
    sweep = Path(shutil.copytree(stopping.parent, tmp_path / "sweep"))
    before = (sweep / "0" / "summary.json").read_bytes()
    over = (*SMALL, CLIP, "trainer.early_stopping.min_delta=1.0", "trainer.epochs=3")
    p = app(sweep, *over, "hydra/launcher=stacked", "trainer.early_stopping.patience=1,null",
            "trainer.resume=true", multirun=True)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert (sweep / "0" / "summary.json").read_bytes() == before  # skipped: not run again
