"""Checkpoints and resume, determinism, divergence and signals, on the real app.

A run killed with SIGKILL at a chosen point (the faults ``KillAtMicroBatch`` and
``KillAfterSave`` of ``tests/faults.py``, added as callbacks) and resumed must end with exactly
the rows and final metrics of an uninterrupted run: on CPU every number is reproducible bit
for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from mnistlab.core.errors import ConfigError, Diverged
from mnistlab.engine import checkpoint
from mnistlab.engine.steps import StepCounter

from faults import KillAfterSave, KillAtMicroBatch, override
from support import ROOT, app, child_env, leet, read_jsonl, read_summary, run_app

# 200 samples (220 less a validation part of 20), batch 16: 13 micro-batches per epoch in
# windows of 3,3,3,3,1 -> 5 steps per epoch, 15 in all. Checkpoints at step 0, every 2 steps
# and at each epoch end; a row every 3 steps, so most checkpoints fall between rows (the
# running sums must be carried).
TINY = (
    "trainer.epochs=3",
    "dataset.limit_train=220",
    "dataset.val_size=20",
    "trainer.batch_size=16",
    "trainer.grad_accum=3",
    "trainer.checkpoint_every_n_steps=2",
    "trainer.log_every_n_steps=3",
    "regularizer=dropout",  # dropout draws from torch's RNG: its state must be restored
    "trainer.num_threads=1",
    "trainer.progress=none",
)


def killed(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """The real app in a subprocess with one thread: for runs a fault kills (SIGKILL)."""
    return run_app(run_dir, *overrides, env=child_env(OMP_NUM_THREADS="1"))


def ok(p: subprocess.CompletedProcess[str]) -> None:
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("baseline")
    ok(app(run, *TINY))
    return run


def final_numbers(run: Path) -> dict[str, Any]:
    s = read_summary(run)
    return {"final": s["final"], "counted": s["counted"], "ok": s["accounting_matches_plan"]}


# ---- unit: the checkpoint module ----------------------------------------------------------


def test_save_is_atomic_and_round_trips_rng_and_state(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / checkpoint.LAST
    counter = StepCounter(micro_batches=7, optimizer_steps=3, samples_seen=70, epochs=0)
    running = {"loss": torch.tensor(1.25, dtype=torch.float64), "correct": 3.0, "count": 10}
    torch.manual_seed(5)
    checkpoint.save(path, model, opt, counter, running, {"a": {"b": 1}}, 123)
    expected = torch.rand(3)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp file left

    state = checkpoint.load_for_resume(path, {"a": {"b": 1}})
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    got_counter, got_running = checkpoint.restore(state, fresh, fresh_opt)
    assert got_counter == counter and got_running == {"loss": 1.25, "correct": 3.0, "count": 10}
    assert state["metrics_bytes"] == 123
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # BN running stats included
    assert fresh_opt.state_dict()["state"][0]["momentum_buffer"] is not None
    checkpoint.set_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), expected)


def test_a_failed_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / checkpoint.LAST
    sums = {"loss": 0.0, "correct": 0, "count": 0}
    checkpoint.save(path, model, opt, StepCounter(optimizer_steps=1), sums, {}, 0)
    before = path.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save(path, model, opt, StepCounter(optimizer_steps=2), sums, {}, 0)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_resume_refuses_missing_foreign_and_different_config(tmp_path: Path) -> None:
    path = tmp_path / checkpoint.LAST
    with pytest.raises(ConfigError, match="no checkpoint at"):
        checkpoint.load_for_resume(path, {})
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        checkpoint.load_for_resume(path, {})
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = {"optimizer": {"lr": 0.1, "momentum": 0.9}, "trainer": {"epochs": 3, "seed": 0}}
    saved["trainer"]["resume"] = False
    checkpoint.save(
        path, model, opt, StepCounter(), {"loss": 0.0, "correct": 0, "count": 0}, saved, 0
    )
    now = {"optimizer": {"lr": 0.2, "momentum": 0.5}, "trainer": {"epochs": 9, "seed": 1}}
    now["trainer"]["resume"] = True
    with pytest.raises(ConfigError) as e:
        checkpoint.load_for_resume(path, now)
    msg = str(e.value)
    assert "optimizer.momentum (0.9 -> 0.5)" in msg and "trainer.seed (0 -> 1)" in msg
    for allowed in ("trainer.epochs (", "trainer.resume (", "optimizer.lr ("):
        assert allowed not in msg
    assert "\n" not in msg


def test_checkpointer_never_saves_a_diverged_model(tmp_path: Path) -> None:
    from mnistlab.engine.loop import Running

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = checkpoint.Checkpointer(tmp_path, model, opt, {}, None)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    running = Running.zeros(torch.device("cpu"), {"loss": 1.0, "correct": 0, "count": 1})
    with pytest.raises(Diverged):
        ckpt.on_epoch_end(StepCounter(optimizer_steps=4), running)
    assert not (tmp_path / checkpoint.LAST).exists()


# ---- the real app ---------------------------------------------------------------------------

# Each case kills twice (the second time in the resumed run), then resumes to the end.
KILLS = {
    # mid-window in epoch 1 (micro-batch 8 of the window 7-9); then right after the resumed
    # run's first checkpoint (step 4: mid-epoch, between two logged rows)
    "mid-window/after-checkpoint": [
        override("kill", KillAtMicroBatch, at=8),
        override("kill", KillAfterSave, nth=1),
    ],
    # right after epoch 1's end checkpoint (the 4th: steps 0, 2, 4, end of epoch); then
    # mid-window in epoch 3 (micro-batch 31 of the window 30-32)
    "epoch-end/mid-window": [
        override("kill", KillAfterSave, nth=4),
        override("kill", KillAtMicroBatch, at=31),
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(KILLS))
def test_sigkill_then_resume_equals_uninterrupted_run(
    case: str, baseline: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    for i, fault in enumerate(KILLS[case]):
        extra = ("trainer.resume=true",) if i else ()
        p = killed(run, *TINY, *extra, *fault)
        assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
        assert (run / checkpoint.LAST).is_file()
    p = app(run, *TINY, "trainer.resume=true")
    ok(p)
    assert "resuming from" in p.stderr + p.stdout
    assert read_jsonl(run / "metrics.jsonl") == read_jsonl(baseline / "metrics.jsonl")
    assert final_numbers(run) == final_numbers(baseline)
    assert read_summary(run)["status"] == "completed"
    # every attempt logged into one W&B run: offline folders are offline-run-<time>-<id>
    ids = {d.name.rsplit("-", 1)[-1] for d in (run / "wandb").glob("offline-run-*")}
    assert len(ids) == 1, ids


@pytest.mark.slow
def test_same_seed_gives_identical_metrics(baseline: Path, tmp_path: Path) -> None:
    ok(app(tmp_path, *TINY))
    assert read_jsonl(tmp_path / "metrics.jsonl") == read_jsonl(baseline / "metrics.jsonl")
    assert final_numbers(tmp_path) == final_numbers(baseline)
    losses = [r["train/loss"] for r in read_jsonl(baseline / "metrics.jsonl") if "train/loss" in r]
    assert len(set(losses)) == len(losses) == 5  # real, changing numbers: 15 steps, a row per 3


@pytest.mark.slow
def test_resume_with_a_different_config_names_the_keys(baseline: Path, tmp_path: Path) -> None:
    before = (baseline / "summary.json").read_bytes(), (baseline / "metrics.jsonl").read_bytes()
    p = app(baseline, *TINY, "trainer.resume=true", "regularizer.dropout=0.5", "trainer.seed=3")
    assert p.returncode == 2
    err = [ln for ln in (p.stdout + p.stderr).splitlines() if "error:" in ln]
    assert len(err) == 1 and "trainer.seed" in err[0]
    assert "regularizer.dropout (0.3 -> 0.5)" in err[0]
    assert "Traceback" not in p.stderr
    # the folder being resumed is left exactly as it was
    after = (baseline / "summary.json").read_bytes(), (baseline / "metrics.jsonl").read_bytes()
    assert after == before


@pytest.mark.slow
def test_resume_can_extend_epochs(baseline: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    ok(app(run, *TINY, "trainer.resume=true", "trainer.epochs=4"))
    s = read_summary(run)
    assert s["status"] == "completed" and s["accounting_matches_plan"]
    assert s["counted"]["total_steps"] == 20
    rows = read_jsonl(run / "metrics.jsonl")
    assert rows[: len(read_jsonl(baseline / "metrics.jsonl"))] == read_jsonl(
        baseline / "metrics.jsonl"
    )
    assert rows[-1]["epoch"] == 4.0


@pytest.mark.slow
def test_sigterm_writes_checkpoint_and_exits_cleanly(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) takes the same path, with exit code 130."""
    sig = signal.SIGTERM
    env = child_env(OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "mnistlab.train", f"hydra.run.dir={tmp_path}"]
    args += ["trainer.epochs=200", "trainer.num_threads=1", "trainer.log_every_n_steps=1"]
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 5):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before the signal"
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err + out
    lines = [ln for ln in (out + err).splitlines() if f"interrupted by {sig.name}" in ln]
    assert len(lines) == 1 and "trainer.resume=true" in lines[0]
    summary = read_summary(tmp_path)
    assert summary["status"] == "interrupted"
    state = torch.load(tmp_path / checkpoint.LAST, weights_only=True)
    assert state["counter"]["optimizer_steps"] == summary["interrupted_at_step"] > 0
    assert read_jsonl(metrics)[-1]["optimizer_step"] == summary["interrupted_at_step"]
    assert state["metrics_bytes"] == metrics.stat().st_size
    # resuming continues the same W&B run: a second offline folder with the first one's id
    epochs = summary["counted"]["epochs"] + 1
    ok(app(tmp_path, f"trainer.epochs={epochs}", "trainer.num_threads=1",
           "trainer.log_every_n_steps=1", "trainer.resume=true"))  # fmt: skip
    folders = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and len({d.name.rsplit("-", 1)[-1] for d in folders}) == 1
    # and keeps the first attempt's name and group (not "trainer.epochs=... trainer.resume=true")
    first, again = (next(r["run"] for r in leet(d) if r["type"] == "run") for d in folders)
    assert (
        first["display_name"]
        == "trainer.epochs=200,trainer.num_threads=1,trainer.log_every_n_steps=1"
    )
    assert (again["display_name"], again["run_group"]) == (
        first["display_name"],
        first["run_group"],
    )


@pytest.mark.slow
def test_divergence_stops_with_status_and_keeps_earlier_checkpoint(tmp_path: Path) -> None:
    p = app(tmp_path, *TINY, "optimizer.lr=1e10")
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    err = [ln for ln in (p.stdout + p.stderr).splitlines() if "error:" in ln]
    assert len(err) == 1 and "try a lower optimizer.lr (now 10000000000.0)" in err[0]
    s = read_summary(tmp_path)
    assert s["status"] == "diverged" and s["diverged_at_step"] >= 1
    state = torch.load(tmp_path / checkpoint.LAST, weights_only=True)
    assert state["counter"]["optimizer_steps"] < s["diverged_at_step"]
    assert state["counter"]["optimizer_steps"] == s["last_checkpoint_step"]
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_a_diverged_job_does_not_stop_the_sweep(tmp_path: Path) -> None:
    p = app(tmp_path, *TINY, "optimizer.lr=1e10,0.05", multirun=True)
    assert p.returncode == 1  # the sweep reports the failed job at the end
    statuses = {
        json.loads((tmp_path / str(i) / "summary.json").read_text())["status"] for i in (0, 1)
    }
    assert statuses == {"diverged", "completed"}
    assert "diverged" in (tmp_path / "sweep_summary.csv").read_text()
