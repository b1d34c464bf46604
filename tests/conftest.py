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


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding small MNIST, FashionMNIST and KMNIST in torchvision's layout."""
    root = tmp_path_factory.mktemp("data")
    for folder in ("MNIST", "FashionMNIST", "KMNIST"):
        write_mnist_layout(root, folder, n_train=600, n_test=200)
    return root
