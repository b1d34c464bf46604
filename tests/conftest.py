"""Shared fixtures (the helpers they use live in ``support.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support import write_mnist_layout

# The suite never touches the network: W&B (the default logger, mode auto) runs offline even on
# a machine with W&B credentials. Tests of mode auto itself set their own environment.
os.environ["WANDB_MODE"] = "offline"
# The app's processes import the test faults (tests/faults.py) through the callbacks seam.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p
)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs ``-n auto --dist loadfile``) each worker keeps to
    a core of its own, and so does everything it starts (affinity is inherited): a run's
    ``trainer.num_threads=auto`` counts that one core, and two workers never put more threads
    on the machine than it has cores (GNU OpenMP threads spin while they wait)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if count > 1 and len(cores) >= count:
        os.sched_setaffinity(0, {cores[int(worker.removeprefix("gw")) % len(cores)]})
        os.environ["OMP_NUM_THREADS"] = "1"  # torch's own default, before it is imported


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding small MNIST, FashionMNIST and KMNIST in torchvision's layout."""
    root = tmp_path_factory.mktemp("data")
    for folder in ("MNIST", "FashionMNIST", "KMNIST"):
        write_mnist_layout(root, folder, n_train=600, n_test=200)
    return root
