"""data.py: the bundled digits and torchvision's own classes reading generated IDX files."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mnistlab.config import DatasetConfig
from mnistlab.core.errors import ConfigError
from mnistlab.engine import data

from support import TorchThreads


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one torch thread each test (see ``support.TorchThreads``)."""
    with TorchThreads(1):
        yield


def test_digits_split_is_fixed_stratified_and_normalized() -> None:
    d = data.load(DatasetConfig(val_size=0))
    assert len(d.train) == data.TRAIN_SIZES["digits"] and d.val is None
    assert len(d.train) + len(d.test) == 1797
    assert d.image_shape == (1, 8, 8)
    assert data.SHAPES["digits"] == (d.image_shape, d.num_classes)  # the report's table
    # normalized with the training split's own statistics
    assert abs(float(d.train.x.double().mean())) < 1e-5
    assert abs(float(d.train.x.double().std()) - 1) < 1e-4
    # stratified: every class in test holds roughly its share
    counts = torch.bincount(d.test.y, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37
    again = data.load(DatasetConfig())
    assert torch.equal(again.test.y, d.test.y)


def test_digits_match_scikit_learn_loader_and_split() -> None:
    """The default run reads sklearn's CSV and splits it itself; both must equal sklearn's."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images, target = data._digits_arrays()
    assert np.array_equal(images, bunch.images) and np.array_equal(target, bunch.target)
    x_tr, x_te, y_tr, y_te = train_test_split(
        bunch.images, bunch.target, test_size=0.2, stratify=bunch.target, random_state=0
    )
    d = data.load(DatasetConfig(val_size=0))
    assert torch.equal(d.train.y, torch.as_tensor(y_tr)) and torch.equal(
        d.test.y, torch.as_tensor(y_te)
    )
    for split, want in ((d.train, x_tr), (d.test, x_te)):  # undo the normalization
        assert np.allclose((split.x.double() * d.std + d.mean).squeeze(1).numpy(), want, atol=1e-4)
    # other labels, fractions and seeds, including classes with tied remainders
    rng = np.random.default_rng(3)
    for seed in range(12):
        y = rng.integers(0, 7, 103)
        frac = (0.1, 0.25, 0.3, 10, 31, 50)[seed % 6]  # fractions, and counts as ints
        ours = data.stratified_split(y, frac, seed)
        theirs = train_test_split(np.arange(len(y)), test_size=frac, stratify=y, random_state=seed)
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True)), seed


# --- the validation split -------------------------------------------------------------------


def test_validation_part_is_carved_seeded_and_stratified_as_scikit_learn_would() -> None:
    """The default split: 10% of the training split, stratified, with the fixed data seed;
    the same as ``train_test_split`` of the training part, each part in its original order."""
    from sklearn.model_selection import train_test_split

    whole = data.load(DatasetConfig(val_size=0)).train
    d = data.load(DatasetConfig())
    assert d.val is not None and (len(d.train), len(d.val)) == (1293, 144)  # 144 = ceil(143.7)
    idx = np.arange(len(whole))
    theirs = train_test_split(idx, test_size=144, stratify=whole.y.numpy(), random_state=0)
    for part, want in zip((d.train, d.val), theirs, strict=True):
        rows = torch.as_tensor(np.sort(want))
        assert torch.equal(part.x, whole.x[rows]) and torch.equal(part.y, whole.y[rows])
    counts = torch.bincount(d.val.y, minlength=10)
    assert int(counts.min()) >= 14 and int(counts.max()) <= 15  # each class its share
    again = data.load(DatasetConfig(val_size=144))  # a count gives the same split
    assert torch.equal(again.val.y, d.val.y) and torch.equal(again.train.x, d.train.x)


def test_validation_part_comes_after_limit_train(mnist_root: Path) -> None:
    cfg = DatasetConfig("mnist", str(mnist_root), False, limit_train=100, val_size=0.25)
    d = data.load(cfg)
    limited = data.load(DatasetConfig("mnist", str(mnist_root), False, 100, val_size=0)).train
    assert d.val is not None and (len(d.train), len(d.val)) == (75, 25)
    together = torch.cat([d.train.y, d.val.y]).sort().values
    assert torch.equal(together, limited.y.sort().values)  # carved from the 100, not all 600


@pytest.mark.parametrize(
    "overrides",
    [{}, {"val_size": 0}, {"val_size": None}, {"val_size": 200}, {"val_size": 0.3},
     {"limit_train": 500}, {"limit_train": 500, "val_size": 0.05}],
)  # fmt: skip
def test_train_size_is_what_training_gets(overrides: dict[str, Any]) -> None:
    """``python -m mnistlab.plan``'s N (no data read) equals the training part loaded."""
    cfg = DatasetConfig(**overrides)
    d = data.load(cfg)
    assert data.train_size(cfg) == len(d.train)
    assert len(d.train) + (len(d.val) if d.val is not None else 0) == (cfg.limit_train or 1437)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"val_size": 9}, "dataset.val_size=9 is not allowed: a count in [10, 1427]"),
        ({"val_size": 1428}, "a count in [10, 1427]"),
        ({"val_size": 0.999}, "dataset.val_size=0.999"),  # ceil leaves 1 sample to train
        ({"limit_train": 15, "val_size": 0.5}, "15 training samples are too few"),
    ],
)
def test_a_split_that_leaves_a_class_out_is_one_line(
    overrides: dict[str, Any], needle: str
) -> None:
    cfg = DatasetConfig(**overrides)
    for check in (data.train_size, data.load):
        with pytest.raises(ConfigError) as e:
            check(cfg)
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_digits_fall_back_to_the_public_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where scikit-learn keeps its CSV elsewhere, ``load_digits`` gives the same arrays."""
    images, target = data._digits_arrays()
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    again_images, again_target = data._digits_arrays()
    assert np.array_equal(images, again_images) and np.array_equal(target, again_target)


def test_default_run_does_not_import_scikit_learn() -> None:
    code = (
        "import sys; from mnistlab.engine import data; from mnistlab.config import DatasetConfig\n"
    )
    code += "data.load(DatasetConfig()); print(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "mnistlab.engine.data" in out.stdout and "sklearn" not in out.stdout


@pytest.mark.parametrize(
    ("name", "folder"),
    [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST"), ("kmnist", "KMNIST")],
)
def test_torchvision_classes_read_generated_idx(mnist_root: Path, name: str, folder: str) -> None:
    d = data.load(DatasetConfig(name, str(mnist_root), download=False, val_size=0))
    assert len(d.train) == 600 and len(d.test) == 200
    assert d.image_shape == (1, 28, 28)
    assert data.SHAPES[name] == (d.image_shape, d.num_classes)
    assert d.train.x.dtype == torch.float32 and d.train.y.dtype == torch.int64
    assert abs(float(d.train.x.double().mean())) < 1e-5
    assert int(d.train.y.min()) >= 0 and int(d.train.y.max()) <= 9


def test_limit_train_is_a_seeded_subset(mnist_root: Path) -> None:
    a = data.load(DatasetConfig("mnist", str(mnist_root), False, limit_train=100, val_size=0))
    b = data.load(DatasetConfig("mnist", str(mnist_root), False, limit_train=100, val_size=0))
    assert len(a.train) == 100
    assert torch.equal(a.train.x, b.train.x)
    with pytest.raises(data.DataError, match="limit_train"):
        data.load(DatasetConfig("mnist", str(mnist_root), False, limit_train=601))


def test_missing_files_name_folder_and_fix(tmp_path: Path) -> None:
    with pytest.raises(data.DataError) as e:
        data.load(DatasetConfig("kmnist", str(tmp_path), download=False))
    msg = str(e.value)
    assert str(tmp_path / "KMNIST" / "raw") in msg and "dataset.download=true" in msg
    assert "\n" not in msg


def test_unreachable_download_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's real download path, pointed at a closed local port instead of the web."""
    import torchvision.datasets as tvd

    monkeypatch.setattr(tvd.KMNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(data.DataError) as e:
        data.load(DatasetConfig("kmnist", str(tmp_path), download=True))
    msg = str(e.value)
    assert msg.startswith("dataset.download=true") and "\n" not in msg
    assert str(tmp_path / "KMNIST" / "raw") in msg
