"""The GPU path: run by ``scripts/gpu_check.sh`` on a machine with CUDA, skipped elsewhere.

Data resident on the device, no per-step host syncs, bf16 autocast, ``torch.compile`` and
channels_last for the cnn, each through the real job (``mnistlab.app.job.run``) on the bundled
digits.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir

from mnistlab.app.job import run as run_job
from mnistlab.config import CONF_DIR, register, validate

from support import read_jsonl, read_summary, run_app

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def run(tmp_path: Path, *overrides: str) -> dict[str, Any]:
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["trainer.progress=none", "logger=none", *overrides]
        )
    validate(cfg)
    tmp_path.mkdir(parents=True, exist_ok=True)
    return run_job(cfg, tmp_path, started=time.perf_counter())


def test_cuda_run_matches_cpu_accounting_and_learns(tmp_path: Path) -> None:
    gpu = run(tmp_path / "gpu", "trainer.accelerator=cuda", "trainer.epochs=5")
    cpu = run(tmp_path / "cpu", "trainer.accelerator=cpu", "trainer.epochs=5")
    assert gpu["status"] == "completed" and gpu["accounting_matches_plan"]
    assert gpu["counted"] == cpu["counted"]
    assert gpu["final"]["test/acc"] > 0.93
    assert abs(gpu["final"]["test/acc"] - cpu["final"]["test/acc"]) < 0.03


def syncs_during_run(tmp_path: Path, batch_size: int) -> tuple[int, dict[str, Any]]:
    """Synchronizing CUDA calls of one run, as PyTorch's sync debug mode reports them."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            s = run(
                tmp_path,
                "trainer.accelerator=cuda",
                "trainer.epochs=2",
                f"trainer.batch_size={batch_size}",
                "trainer.log_every_n_steps=100000",  # rows only at the end
                "bn_stats.every_n_steps=100000",  # the exact BN pass only at the end
            )
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught), s


def test_no_per_step_host_sync(tmp_path: Path) -> None:
    """Twice the optimizer steps over the same epochs (half the batch) must not add syncs in
    proportion: set-up, evaluations and epoch-end checkpoints sync, optimizer steps don't."""
    few, s_few = syncs_during_run(tmp_path / "b32", 32)
    many, s_many = syncs_during_run(tmp_path / "b16", 16)
    assert s_few["status"] == s_many["status"] == "completed"
    extra_steps = s_many["plan"]["total_steps"] - s_few["plan"]["total_steps"]
    assert extra_steps == 80  # 1293 training digits: 41 and 81 micro-batches an epoch, 2 epochs
    assert many - few < extra_steps / 10, (few, many)


@pytest.mark.parametrize(
    "overrides",
    [
        ("trainer.precision=bf16",),
        ("trainer.compile=true",),
        ("model=cnn",),
        ("model=cnn", "trainer.precision=bf16"),
    ],
)
def test_gpu_options_complete_and_learn(tmp_path: Path, overrides: tuple[str, ...]) -> None:
    from torch._dynamo.utils import counters

    counters.clear()
    s = run(tmp_path, "trainer.accelerator=cuda", "trainer.epochs=5", *overrides)
    assert s["status"] == "completed" and s["accounting_matches_plan"]
    assert s["final"]["test/acc"] > 0.85, s["final"]
    if "trainer.compile=true" in overrides:  # dynamo really compiled the training forward
        assert counters["frames"]["ok"] >= 1, dict(counters["frames"])


def test_a_stacked_sweep_on_cuda_trains_each_job_as_alone(tmp_path: Path) -> None:
    """``hydra/launcher=stacked`` on the GPU: one group of four, each job completed with its
    plan, its losses those of the same job run by the basic launcher on the GPU (cuBLAS sums
    in another order: 1e-3; no dropout, whose CUDA masks differ by design)."""
    jobs = ("trainer.accelerator=cuda", "trainer.epochs=2", "trainer.log_every_n_steps=1",
            "logger=none", "trainer.seed=0,1", "optimizer.lr=0.05,0.1")  # fmt: skip
    for launcher in ("basic", "stacked"):
        p = run_app(tmp_path / launcher, *jobs, f"hydra/launcher={launcher}", multirun=True)
        assert p.returncode == 0, p.stderr[-3000:]
    for i in range(4):
        alone, job = tmp_path / "basic" / str(i), tmp_path / "stacked" / str(i)
        s = read_summary(job)
        assert (s["status"], s["stacked_jobs"], s["accounting_matches_plan"]) == (
            "completed", 4, True
        )  # fmt: skip
        assert s["counted"] == read_summary(alone)["counted"]
        rows = [(a, b) for a, b in zip(read_jsonl(alone / "metrics.jsonl"),
                                       read_jsonl(job / "metrics.jsonl"), strict=True)
                if "train/loss" in a][:50]  # fmt: skip
        for a, b in rows:
            assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-3)
