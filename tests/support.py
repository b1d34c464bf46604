"""What the tests share: MNIST-format IDX files that torchvision's own classes read, the real
Hydra app run in a subprocess (:func:`run_app`: for signals, kills, ranks and console
scripts) or in this process (:func:`app`: everything else), and readers of what a run
leaves behind (rows, summaries, PNGs, W&B's offline files)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_idx_images(path: Path, images: np.ndarray) -> None:
    """IDX3: magic 0x00000803, then count, rows, cols (big-endian), then uint8 pixels."""
    n, h, w = images.shape
    path.write_bytes(struct.pack(">IIII", 0x0803, n, h, w) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    """IDX1: magic 0x00000801, then count, then uint8 labels."""
    path.write_bytes(struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes())


def make_images(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake digits: class k lights a class-specific block of pixels, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, size, size)).astype(np.int32)
    cell = size // 5
    for i, k in enumerate(labels):
        r, c = divmod(int(k), 5)
        images[i, r * cell * 2 : r * cell * 2 + cell, c * cell : c * cell + cell] += 180
    return np.clip(images, 0, 255).astype(np.uint8), labels


def write_mnist_layout(root: Path, folder: str, n_train: int, n_test: int, size: int = 28) -> Path:
    """torchvision's raw layout: ``root/<Class>/raw/{train,t10k}-{images,labels}-idx*-ubyte``."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = make_images(n, seed, size)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return raw


def run_app(
    run_dir: Path,
    *overrides: str,
    flags: tuple[str, ...] = (),
    module: str = "mnistlab.train",
    timeout: float = 240,
    env: dict[str, str] | None = None,
    multirun: bool = False,
) -> subprocess.CompletedProcess[str]:
    """The real Hydra app in a subprocess, with its output folder pinned to ``run_dir``.

    ``flags`` (``--cfg job``) go before the overrides, as Hydra's parser wants; ``multirun``
    adds ``-m`` and pins ``hydra.sweep.dir`` instead; ``env``, if given, is the whole
    environment of the child (by default :func:`child_env`: this process's, less the W&B
    service an in-process run left in it)."""
    if env is None:
        env = child_env()
    where = f"hydra.sweep.dir={run_dir}" if multirun else f"hydra.run.dir={run_dir}"
    args = [sys.executable, "-m", module, *(["-m"] if multirun else []), *flags, where]
    return subprocess.run(
        [*args, *overrides], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )


def app(
    run_dir: Path,
    *overrides: str,
    flags: tuple[str, ...] = (),
    multirun: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """The real Hydra app (``mnistlab.train.cli``) called in this process, as
    ``python -m mnistlab.train`` would run it: same arguments, its stdout, stderr and exit
    code returned as :func:`run_app` returns them. ``env`` entries are set for the call and
    restored after it. The process's torch thread count is restored too (a run sets it)."""
    import torch
    from hydra.core.global_hydra import GlobalHydra

    from mnistlab import train

    where = f"hydra.sweep.dir={run_dir}" if multirun else f"hydra.run.dir={run_dir}"
    argv = ["mnistlab.train", *(["-m"] if multirun else []), *flags, where, *overrides]
    out, err = io.StringIO(), io.StringIO()
    threads, saved_argv = torch.get_num_threads(), sys.argv
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    code = 0
    GlobalHydra.instance().clear()
    try:
        os.environ.update(env or {})
        sys.argv = argv
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            train.cli()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
        torch.set_num_threads(threads)
        GlobalHydra.instance().clear()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def png_size(path: Path) -> tuple[int, int]:
    """A PNG's width and height from its IHDR chunk, after checking the PNG signature."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR", f"{path} has no IHDR chunk first"
    return struct.unpack(">II", head[16:24])


def no_credentials_env(tmp: Path) -> dict[str, str]:
    """The jobs' environment: no W&B variables, an empty netrc, fresh W&B config folders."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        WANDB_SILENT="true",
        NETRC=str(tmp / "netrc"),
        WANDB_CONFIG_DIR=str(tmp / "wandb-config"),
        WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
        WANDB_DATA_DIR=str(tmp / "wandb-data"),
    )
    return env


def wandb_run_dir(job: Path) -> Path:
    (run,) = sorted((job / "wandb").glob("offline-run-*"))
    assert list(run.glob("run-*.wandb")), f"no transaction log in {run}"
    return run


def leet(run: Path, *flags: str) -> Any:
    """W&B's own reader: ``wandb leet inspect --json`` (records) or ``--summary --json``."""
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", *flags, "--json", str(run)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    if "--summary" in flags:
        return json.loads(out)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def assert_one_line_error(p: subprocess.CompletedProcess[str], *needles: str) -> str:
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "HYDRA_FULL_ERROR" not in out, out[-3000:]
    lines = [ln for ln in out.splitlines() if "error:" in ln]
    assert len(lines) == 1, out[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- app & sweeps helpers


class TorchThreads:
    """``with TorchThreads(n):`` torch's intra-op thread count is ``n`` inside the block, the
    process's own after it. Tests of tiny tensors use one: on a small shared CPU, OpenMP threads
    spin waiting for descheduled partners (the Monte Carlo BN tests ran 20x slower with two)."""

    def __init__(self, n: int) -> None:
        self.n, self.saved = n, 0

    def __enter__(self) -> None:
        import torch

        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self.saved)


# --- processes & faults helpers


def stop_joblib_workers() -> None:
    """Let the loky workers that a joblib sweep run by :func:`app` left idle in this process
    (joblib keeps them for its next call; each holds a whole torch) end now, unwaited."""
    if "joblib" in sys.modules:
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=False)


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for an app subprocess (unbuffered, W&B quiet), plus
    ``extra``; without ``WANDB_SERVICE``, which a W&B run of :func:`app` leaves set here. A
    child that inherits it logs through this process's W&B service, and a run killed there
    keeps its id in use: the resume that follows is refused ("run ID ... is in use")."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(PYTHONUNBUFFERED="1", WANDB_SILENT="true", **extra)
    return env
