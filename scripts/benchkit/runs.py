"""Running the real app: configs composed as its CLI composes them, in-process jobs,
``python -m mnistlab.train`` subprocesses, and the MNIST-format files they read."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mnistlab.config import register, validate

from .common import Bench, sync

REPO = Path(__file__).resolve().parents[2]


def write_idx(root: Path, n_train: int, n_test: int) -> None:
    """MNIST's raw layout (IDX3 images, IDX1 labels): learnable fake digits, same shape."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for k in range(10):  # class k lights its own 5x5 block
            r, c = divmod(k, 5)
            images[labels == k, r * 10 : r * 10 + 5, c * 5 : c * 5 + 5] += 180
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x0803, n, 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x0801, n) + labels.tobytes()
        )


# ---------------------------------------------------------------------------------------
# in-process runs


def compose(overrides: list[str]) -> Any:
    """The config exactly as ``python -m mnistlab.train <overrides>`` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    validate(cfg)
    return cfg


def mnist_overrides(b: Bench, model: str, n: int, batch: int = 64, epochs: int = 1) -> list[str]:
    """A run on the bench's MNIST-format data: ``n`` samples of the training split (the default
    validation part, 10% of them, is carved out), one test pass at the end."""
    return [
        "dataset=mnist",
        f"dataset.root={b.root}",
        "dataset.download=false",
        f"dataset.limit_train={n}",
        "dataset.limit_test=1000",
        f"model={model}",
        f"trainer.batch_size={batch}",
        f"trainer.epochs={epochs}",
        f"trainer.eval_every_n_epochs={epochs}",
    ]


def ours(b: Bench, overrides: list[str]) -> tuple[dict[str, Any], float, Path]:
    """One in-process run of the real app's ``train_job``: (summary, seconds, run folder)."""
    from mnistlab.app.job import run as run_job

    base = [f"trainer.accelerator={b.device}", "trainer.progress=none"]
    if not any(o.startswith("logger=") for o in overrides):
        base.append("logger=none")
    cfg = compose(base + overrides)
    out = Path(tempfile.mkdtemp(dir=b.work, prefix="run-"))
    sync(b.device)
    t0 = time.perf_counter()
    summary = run_job(cfg, out, started=time.perf_counter())
    sync(b.device)
    elapsed = time.perf_counter() - t0
    if summary.get("status") != "completed":
        raise RuntimeError(f"run {overrides} ended {summary.get('status')}: {summary.get('error')}")
    return summary, elapsed, out


def train_rate(summary: dict[str, Any]) -> float:
    """Samples per second of training alone: the loop's evaluations and exact BN-statistics
    passes are taken out (each has its own share row)."""
    t = summary["timings"]
    extra = t.get("eval_s", 0.0) + (t.get("bn_stats_s") or 0.0)
    return summary["counted"]["samples_seen"] / max(1e-9, t["train_s"] - extra)


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


# ---------------------------------------------------------------------------------------
# subprocesses


def train_cmd(*overrides: str, multirun: bool = False) -> list[str]:
    """``python -m mnistlab.train`` arguments, quiet: no logger, no progress bar. Hydra's
    ``-m`` (multirun) flag goes before the overrides."""
    return [
        "-m",
        "mnistlab.train",
        *(["-m"] if multirun else []),
        "logger=none",
        "trainer.progress=none",
        *overrides,
    ]


def env_for(threads: int) -> dict[str, str]:
    """A child's environment: this checkout's ``src`` first, ``threads`` OpenMP threads."""
    src = str(REPO / "src")
    path = os.environ.get("PYTHONPATH", "")
    return dict(
        os.environ,
        PYTHONPATH=f"{src}{os.pathsep}{path}" if path else src,
        OMP_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
        WANDB_SILENT="true",
    )


# GNU OpenMP's default wait (spin, then sleep), as before mnistlab set OMP_WAIT_POLICY=PASSIVE:
# an unrecognised value (libgomp says so on stderr) leaves the default, and the package's
# setdefault keeps a value that is set.
SPINNING = {"OMP_WAIT_POLICY": ""}


def app(
    args: list[str], threads: int, capture_stderr: bool = False, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start ``python <args>`` in the repo, output discarded (stderr kept if asked); ``env``
    entries on top of :func:`env_for`'s."""
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env={**env_for(threads), **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE if capture_stderr else subprocess.DEVNULL,
        text=True,
    )


def wait(p: subprocess.Popen[str], timeout: float = 600) -> str:
    """Wait for ``p``; its stderr, or an error with the tail of it if it failed."""
    _, err = p.communicate(timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, p.args))} exited {p.returncode}: {(err or '')[-400:]}"
        )
    return err or ""
