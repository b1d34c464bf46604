"""Shared fixtures: MNIST-format IDX files that torchvision's own classes read, and a way to
run the real Hydra app in a subprocess."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# The suite never touches the network: W&B (the default logger, mode auto) runs offline even on
# a machine with W&B credentials. Tests of mode auto itself set their own environment.
os.environ["WANDB_MODE"] = "offline"
# The app's processes import the test faults (tests/faults.py) through the callbacks seam.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p
)


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


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding small MNIST, FashionMNIST and KMNIST in torchvision's layout."""
    root = tmp_path_factory.mktemp("data")
    for folder in ("MNIST", "FashionMNIST", "KMNIST"):
        write_mnist_layout(root, folder, n_train=600, n_test=200)
    return root


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
    environment of the child."""
    if env is None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    where = f"hydra.sweep.dir={run_dir}" if multirun else f"hydra.run.dir={run_dir}"
    args = [sys.executable, "-m", module, *(["-m"] if multirun else []), *flags, where]
    return subprocess.run(
        [*args, *overrides], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )


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
