"""The performance plumbing: first-step clock, thread split, lazy heavy imports, the bench.

No timed assertions: these check that the numbers exist and that the code paths behave.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from mnistlab.app.job import run as run_job
from mnistlab.config import CONF_DIR, register, validate
from mnistlab.processes.threads import PARALLEL_FLOPS, resolve_threads, threads_for_model

from support import ROOT, app, child_env, read_jsonl, read_summary, run_app, stop_joblib_workers

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def test_summary_records_first_step_and_threads(tmp_path: Path) -> None:
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            # A fixed count: with auto, the thread governor may change the count mid-run on a
            # busy machine (as it should), and the count at the end would differ from the start's.
            overrides=[
                "trainer.epochs=1",
                "trainer.progress=none",
                "trainer.accelerator=cpu",
                "trainer.num_threads=1",
            ],
        )
    validate(cfg)
    s = run_job(cfg, tmp_path, started=time.perf_counter())
    t = s["timings"]
    assert s["status"] == "completed"
    assert t["startup_s"] <= t["first_step_s"] <= t["wall_s"]
    assert t["first_step_unix"] > 1.6e9
    assert s["num_threads"] == torch.get_num_threads()


def test_auto_threads_come_from_the_machine_and_the_model_only() -> None:
    assert resolve_threads("auto") == resolve_threads("adaptive") == CORES
    assert resolve_threads("auto", 2) == max(1, CORES // 2)  # ranks on this machine
    assert resolve_threads("auto", 4 * CORES) == 1  # never below one
    assert resolve_threads(3, 2) == 3  # an explicit count is kept
    # a micro-batch too small to split trains on one thread; a large one keeps the cores
    assert threads_for_model(CORES, 0.5 * PARALLEL_FLOPS) == 1
    assert threads_for_model(CORES, 2 * PARALLEL_FLOPS) == CORES


@pytest.mark.slow
def test_a_joblib_job_trains_as_the_basic_launchers_job(tmp_path: Path) -> None:
    """Two jobs, two at a time in joblib's workers, and the same two one after the other:
    the same threads (``auto`` ignores the launcher) and the same rows, byte for byte."""
    args = ("trainer.seed=0,1", "trainer.epochs=1", "dataset.limit_train=128",
            "trainer.progress=none")  # fmt: skip
    try:  # the sweep in this process; its jobs in joblib's worker processes
        joblib = app(tmp_path / "joblib", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                     *args, multirun=True, env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    finally:
        stop_joblib_workers()
    assert joblib.returncode == 0, joblib.stderr[-2000:]
    basic = app(tmp_path / "basic", *args, multirun=True)
    assert basic.returncode == 0, basic.stderr[-2000:]
    for job in ("0", "1"):
        a, b = (read_summary(tmp_path / k / job) for k in ("joblib", "basic"))
        # the default MLP's micro-batch is too small to split: one thread, whatever the cores
        assert a["threads"] == b["threads"] == {"policy": "auto", "schedule": [[0, 1]]}
        assert a["final"] == b["final"]
        rows = [(tmp_path / k / job / "metrics.jsonl").read_bytes() for k in ("joblib", "basic")]
        assert rows[0] == rows[1]


def _imports(tmp_path: Path, *overrides: str) -> set[str]:
    """What a fresh ``python -m mnistlab.train`` imports (``-X importtime``): a process of
    its own, since this one has imported everything already."""
    env = child_env(OMP_NUM_THREADS="1")
    args = [sys.executable, "-X", "importtime", "-m", "mnistlab.train"]
    args += [f"hydra.run.dir={tmp_path}", "trainer.epochs=1", "trainer.progress=none", *overrides]
    p = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    assert read_summary(tmp_path)["status"] == "completed"
    return {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if "|" in line}


@pytest.mark.slow
def test_default_run_imports_neither_torchvision_nor_wandb(tmp_path: Path) -> None:
    """The default digits run never imports torchvision; W&B is imported only by its sink
    (the default logger), never with ``logger=none``."""
    imported = _imports(tmp_path / "default")
    assert "torch" in imported and "mnistlab.engine.loop" in imported  # the probe sees real imports
    assert not {m for m in imported if m.split(".")[0] == "torchvision"}
    assert "wandb" in imported  # the default logger is W&B
    local = _imports(tmp_path / "none", "logger=none")
    assert not {m for m in local if m.split(".")[0] in ("torchvision", "wandb")}


def test_mnist_run_uses_torchvision(tmp_path: Path, mnist_root: Path) -> None:
    """...and the lazy import still works when a torchvision dataset is asked for."""
    p = app(
        tmp_path,
        "dataset=mnist",
        f"dataset.root={mnist_root}",
        "dataset.download=false",
        "trainer.epochs=1",
        "trainer.progress=none",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert read_summary(tmp_path)["status"] == "completed"


@pytest.mark.slow
def test_compiled_model_is_not_recompiled_by_bn_points(tmp_path: Path) -> None:
    """The BN-statistics pass hooks the BN layers. Run through the compiled model, dynamo
    would trace the hooks and their accumulators too, and recompile them at every point until
    its limit (8 each): seconds of compiling and a warning for nothing. The pass runs eagerly.
    And the training forward really is compiled (the in-place ``Module.compile()`` captured no
    frame of an ``nn.Sequential`` before torch 2.14: compile silently did nothing).

    A process of its own: torch reads ``TORCH_LOGS`` when it is imported. A BN point at every
    step, 12 of them (180 samples, batch 32, 2 epochs): more than the limit, were they traced.
    One thread throughout: a thread count changed by ``auto`` is a recompile of its own."""
    env = child_env(TORCH_LOGS="recompiles,dynamo")
    p = run_app(
        tmp_path, "trainer.compile=true", "logger=none", "trainer.epochs=2",
        "dataset.limit_train=200", "bn_stats.every_n_steps=1", "trainer.num_threads=1",
        "trainer.accelerator=cpu", env=env, timeout=400,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert read_summary(tmp_path)["status"] == "completed"
    assert read_summary(tmp_path)["bn_updates_equal_micro_batches"] is True
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert sum(any(k.startswith("bn/") for k in r) for r in rows) > 8  # past dynamo's limit
    assert p.stderr.count("calling compiler function inductor") >= 1, p.stderr[-3000:]
    recompiles = p.stderr.count("Recompiling function")
    # the epoch's short last batch, evaluation's no-grad mode and its batch size: a few at most
    assert recompiles <= 4, p.stderr[-3000:]
    traced = [ln for ln in p.stderr.splitlines() if "Recompiling" in ln and "mnistlab/bn/" in ln]
    assert not traced, traced
    assert "recompile_limit" not in p.stderr and "cache_size_limit" not in p.stderr


def test_thread_governor_gives_way_to_a_busy_process() -> None:
    """``trainer.num_threads=adaptive`` follows the load: a process that keeps one of our cores
    busy leaves one thread to training (two spinning OpenMP threads beside it would crawl)."""
    from mnistlab.processes.threads import ThreadGovernor, cpu_cores

    if cpu_cores() < 2:
        pytest.skip("needs 2 cores")
    gov = ThreadGovernor(most=2, every_s=0.0, start_step=0)
    assert [gov.threads_for(x) for x in (0.0, 0.5, 0.9, 1.5, 3.0)] == [2, 2, 1, 1, 1]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # the hog is running
        gov.last = gov._sample()
        time.sleep(1.0)  # this process idles: the busy core is the hog's
        gov.on_step(1)
        assert torch.get_num_threads() == 1 and gov.schedule == [[0, 2], [1, 1]]
    finally:
        hog.kill()
        hog.wait()
        torch.set_num_threads(before)


@pytest.mark.slow
def test_two_default_runs_side_by_side_write_the_same_bytes(tmp_path: Path) -> None:
    """The same command twice at once, each free to use every core of the machine (not this
    worker's one): each is the other's load, and ``auto`` does not follow load, so the rows and
    the summary's numbers are the same, byte for byte."""

    def every_core() -> None:  # the machine's cores, as a run started from a shell has them
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, os.sched_getaffinity(1))

    env = {k: v for k, v in child_env().items() if k != "OMP_NUM_THREADS"}
    cmd = [sys.executable, "-m", "mnistlab.train", "trainer.epochs=4", "logger=none",
           "trainer.progress=none"]  # fmt: skip
    out = subprocess.DEVNULL, subprocess.PIPE
    procs = [
        subprocess.Popen(
            [*cmd, f"hydra.run.dir={tmp_path / name}"],
            cwd=ROOT,
            env=env,
            stdout=out[0],
            stderr=out[1],
            text=True,
            preexec_fn=every_core,
        )
        for name in ("a", "b")
    ]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
    a, b = (read_summary(tmp_path / name) for name in ("a", "b"))
    assert a["final"] == b["final"] and a["bn"] == b["bn"] and a["threads"] == b["threads"]
    assert (tmp_path / "a" / "metrics.jsonl").read_bytes() == (
        tmp_path / "b" / "metrics.jsonl"
    ).read_bytes()
