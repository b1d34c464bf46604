"""``python -m mnistlab.eval``: a saved run evaluated again from its checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mnistlab.config import Config
from mnistlab.engine import checkpoint, data, models
from mnistlab.engine.steps import StepCounter
from mnistlab.eval import main as eval_main

from support import ROOT, app, read_summary


def evaluate(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m mnistlab.eval ARGS`` in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "mnistlab.eval", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=240, check=False,
    )  # fmt: skip


def evaluate_here(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """``mnistlab.eval``'s command in this process, which must succeed: what it printed
    (the torch thread count it sets is put back)."""
    capsys.readouterr()
    threads = torch.get_num_threads()
    try:
        code = eval_main(list(args))
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def test_eval_reproduces_the_runs_final_metrics_and_precise_bn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run repaired its BN statistics at the end (PreciseBN), after its last checkpoint:
    eval of that checkpoint gives the accuracy before the repair, and with
    ``bn_stats.recalibrate=true`` the run's final (repaired) test accuracy."""
    run = tmp_path / "run"
    args = ("trainer.epochs=2", "trainer.num_threads=1", "logger=none")
    p = app(run, *args, "model=cnn", "model.hidden=[32]", "bn_stats.recalibrate=true")
    assert p.returncode == 0, p.stderr
    s = read_summary(run)

    printed_out = evaluate_here(capsys, str(run))
    report = json.loads((run / "eval.json").read_text())
    m = report["metrics"]
    ds = data.load(OmegaConf.create(s["config"]["dataset"]))  # every split but train: test, ...
    splits = {f"{name}/{k}" for name in ds.splits() if name != "train" for k in ("loss", "acc")}
    assert {k for k in m if not k.startswith("bn/")} == splits and "test/acc" in splits
    assert m["test/acc"] == s["final"]["bn/test_acc_before_recal"]
    assert "bn/test_acc_after_recal" not in m  # PreciseBN only when asked
    for key in ("bn/gap_mean", "bn/gap_max", "bn/logvar_ratio_mean", "bn/pred_gap_mean"):
        assert m[key] == pytest.approx(s["final"][key], rel=1e-9), key
    assert report["bn"].keys() == s["bn"].keys() == {"1", "5", "10"}
    assert report["counted"] == s["counted"] and report["bn_updates_equal_micro_batches"]
    printed = [line.split() for line in printed_out.splitlines()]
    assert ["test/acc", f"{m['test/acc']:.6g}"] in printed
    assert ["wrote", str(run / "eval.json")] in printed

    out = tmp_path / "recal.json"
    evaluate_here(
        capsys, f"{run}/checkpoints/last.pt", "bn_stats.recalibrate=true", "--out", str(out)
    )
    r = json.loads(out.read_text())["metrics"]
    assert r["bn/test_acc_after_recal"] == s["final"]["test/acc"]
    assert r["bn/test_acc_before_recal"] == m["test/acc"]
    assert r["bn/gap_mean_after_recal"] < 1e-5 < m["bn/gap_mean"]


def _tiny_checkpoint(run: Path) -> Path:
    """A real checkpoint of the default config's model, written by checkpoint.save."""
    cfg = OmegaConf.structured(Config)
    model = models.build(cfg.model, (1, 8, 8), 10, 0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = OmegaConf.to_container(cfg, resolve=True)
    running = {"loss": 0.0, "correct": 0.0, "count": 0}
    path = run / checkpoint.LAST
    checkpoint.save(path, model, opt, StepCounter(), running, config, 0)  # type: ignore[arg-type]
    return path


def _one_error_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = eval_main(list(argv))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_a_missing_or_damaged_run_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "does not exist" in _one_error_line(capsys, str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    assert "holds no checkpoints/last.pt" in _one_error_line(capsys, str(tmp_path / "empty"))

    ckpt = _tiny_checkpoint(tmp_path / "run")
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # a copy cut short
    assert "is not a readable checkpoint" in _one_error_line(capsys, str(tmp_path / "run"))
    _tiny_checkpoint(tmp_path / "run")
    state = torch.load(ckpt, weights_only=True)
    next(iter(state["model"].values())).add_(1.0)  # contents no longer match the digest
    torch.save(state, ckpt)
    assert "is damaged" in _one_error_line(capsys, str(ckpt))
    torch.save({"weights": torch.zeros(3)}, ckpt)  # some other program's file
    assert "is not a mnistlab checkpoint" in _one_error_line(capsys, str(ckpt))
    assert not (tmp_path / "run" / "eval.json").exists()


def test_overrides_are_checked_and_must_fit_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    _tiny_checkpoint(run)
    cases = {
        "bn_stats.recal=true": "bn_stats.recal is not a key of bn_stats",
        "trainer.batch_size=abc": "trainer.batch_size=abc: Value 'abc'",
        "trainer.accelerator=tpu": "trainer.accelerator='tpu' is not allowed",
        "recalibrate": "'recalibrate' is not an override: give key=value",
        "model.hidden=[7]": "does not fit the model of this config (size mismatch",
    }
    for override, needle in cases.items():
        assert needle in _one_error_line(capsys, str(run), override), override


def test_eval_exits_2_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    p = evaluate(str(tmp_path))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path}/checkpoints/last.pt is not a readable checkpoint (")
