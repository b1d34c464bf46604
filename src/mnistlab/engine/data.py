"""Datasets, loaded once into memory tensors and batched by index.

MNIST-style datasets are tiny: the whole training set fits in a few hundred MB, so the
fastest loader is none at all. Each dataset is read once (torchvision's own classes parse the
IDX files), normalized with statistics of its training split, and cached per process so a
sweep's jobs share it. torchvision is imported only when one of its datasets is asked for.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mnistlab.core.errors import ConfigError, UserError
from mnistlab.core.imports import locate


class DataError(UserError):
    """A dataset could not be had: one line naming the folder and the fix."""


@dataclass(frozen=True)
class Split:
    x: Tensor  # float32, (N, 1, H, W), normalized
    y: Tensor  # int64, (N,)

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Data:
    name: str
    train: Split  # what the model trains on: the plan's N
    test: Split
    num_classes: int
    mean: float
    std: float
    val: Split | None = None  # carved from the training split (``dataset.val_size``)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.x.shape[1:]
        return int(c), int(h), int(w)

    def splits(self) -> dict[str, Split]:
        """Every split this dataset holds, by field name (``train``, ``test``, ...): code that
        moves or evaluates all of them keeps working when a split is added."""
        named = ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        return {name: s for name, s in named if isinstance(s, Split)}


# Dataset seed for the digits split, limit_* subsets and the validation split: fixed, so every
# run of a sweep sees the same data whatever its trainer.seed.
DATA_SEED = 0


def _normalize(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor, float, float]:
    """Scale with the training split's own mean and std, never hard-coded constants."""
    train64 = train.double()
    mean, std = float(train64.mean()), float(train64.std())
    return ((train - mean) / std).float(), ((test - mean) / std).float(), mean, std


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 images (float64) and labels that ``sklearn.datasets.load_digits`` returns,
    read from the CSV file scikit-learn ships. Importing ``sklearn.datasets`` costs about 0.7 s
    of every run's start-up (it pulls in scipy), and a sweep pays it in every process."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    folders = list(spec.submodule_search_locations or []) if spec else []
    csv = [Path(f) / "datasets" / "data" / "digits.csv.gz" for f in folders]
    if csv and csv[0].is_file():
        table = np.loadtxt(csv[0], delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # another layout: the public loader

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


def _approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Per-class draws summing to ``draws``: floor of each class's share, then one more for
    the largest remainders, ties broken at random (scikit-learn's ``_approximate_mode``)."""
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    remainder = continuous - floored
    for value in np.sort(np.unique(remainder))[::-1]:
        if need <= 0:
            break
        (tied,) = np.where(remainder == value)
        take = min(len(tied), need)
        floored[rng.choice(tied, size=take, replace=False)] += 1
        need -= take
    return floored.astype(np.int64)


def stratified_split(
    y: np.ndarray, test_size: float | int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: the split ``train_test_split(..., test_size=test_size,
    stratify=y, random_state=seed)`` makes (a single ``StratifiedShuffleSplit``), step for step:
    a float is a fraction (rounded up), an int a count. Written out so the default run needs
    no scikit-learn import; a test compares the two."""
    n_test = test_size if isinstance(test_size, int) else math.ceil(test_size * len(y))
    n_train = len(y) - n_test
    _, y_idx = np.unique(y, return_inverse=True)
    counts = np.bincount(y_idx)
    per_class = np.split(np.argsort(y_idx, kind="mergesort"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(counts, n_train, rng)
    t_i = _approximate_mode(counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for members, k_train, k_test in zip(per_class, n_i, t_i, strict=True):
        shuffled = members.take(rng.permutation(len(members)), mode="clip")
        train.extend(shuffled[:k_train])
        test.extend(shuffled[k_train : k_train + k_test])
    return rng.permutation(train), rng.permutation(test)


def _digits(root: str, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits with a fixed, seeded, stratified 80/20 split."""
    images, target = _digits_arrays()
    train, test = stratified_split(target, 0.2, DATA_SEED)

    def as_x(a: np.ndarray) -> Tensor:
        return torch.as_tensor(a, dtype=torch.float32).unsqueeze(1)

    def as_y(a: np.ndarray) -> Tensor:
        return torch.as_tensor(a, dtype=torch.int64)

    return as_x(images[train]), as_y(target[train]), as_x(images[test]), as_y(target[test])


# IDX element types (the magic number's third byte) and their sizes in bytes.
_IDX_TYPES = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}


def idx_problem(path: Path) -> str | None:
    """What is wrong with one IDX file, or None. torchvision's parser only asserts, so its
    errors don't say which file is bad or how; this names the file and the fault."""
    data = path.read_bytes()
    magic = int.from_bytes(data[:4].ljust(4, b"\0"), "big")
    want_dims = re.search(r"idx(\d)", path.name)
    nd = data[3] if len(data) >= 4 else 0
    if (
        len(data) < 4
        or data[:2] != b"\0\0"
        or data[2] not in _IDX_TYPES
        or not 1 <= nd <= 3
        or (want_dims is not None and nd != int(want_dims.group(1)))
    ):
        dims = want_dims.group(1) if want_dims else "1-3"
        return f"{path.name} has magic number 0x{magic:08x}, not an IDX file of {dims} dimension(s)"
    header = 4 + 4 * nd
    if len(data) < header:
        return f"{path.name} is truncated: {len(data)} bytes, its header alone needs {header}"
    shape = struct.unpack(f">{nd}I", data[4:header])
    want = header + math.prod(shape) * _IDX_TYPES[data[2]]
    if len(data) != want:
        kind = "truncated" if len(data) < want else "too long"
        shape_s = "x".join(map(str, shape))
        return f"{path.name} is {kind}: {len(data)} bytes, its header ({shape_s}) says {want}"
    return None


def _idx_problems(folder: Path) -> str | None:
    """The first bad IDX file in a raw folder (compressed downloads are skipped)."""
    if not folder.is_dir():
        return None
    for path in sorted(folder.iterdir()):
        if "idx" in path.name and path.is_file() and not path.name.endswith(".gz"):
            problem = idx_problem(path)
            if problem:
                return problem
    return None


def _torchvision(class_name: str, **kwargs: object) -> Callable:
    """A loader that reads through torchvision's own dataset class (and its download path)."""

    def load(root: str, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        import torchvision.datasets as tvd

        cls = getattr(tvd, class_name)
        folder = Path(root) / cls.__name__ / "raw"
        where = f"dataset.root={root!r}"
        splits = []
        for train in (True, False):
            try:
                ds = cls(root, train=train, download=download, **kwargs)
            except Exception as e:
                raise _read_error(e, where, folder, class_name) from None
            x = torch.as_tensor(ds.data).to(torch.float32).div_(255.0).unsqueeze(1)
            y = torch.as_tensor(ds.targets).to(torch.int64).reshape(-1)
            splits += [x, y]
        return splits[0], splits[1], splits[2], splits[3]

    return load


def _read_error(e: Exception, where: str, folder: Path, name: str) -> DataError:
    """torchvision's failure to read or download, as the one line that names the cause."""
    text = str(e).lower()
    if isinstance(e, OSError) and e.filename is not None:  # a local file, not the network
        return DataError(f"{where}: cannot read {e.filename}: {e.strerror}; check its permissions")
    if "error downloading" in text or isinstance(e, OSError):  # URLError, HTTPError, sockets
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        return DataError(
            f"dataset.download=true: downloading {name} into {folder} failed ({reason}); check "
            "the network, or place the IDX files there and set dataset.download=false"
        )
    if isinstance(e, RuntimeError) and "not found" in text:
        return DataError(
            f"{where}: {name} files not found in {folder}; "
            "set dataset.download=true or put the IDX files there"
        )
    empty = [f.name for f in sorted(folder.glob("*idx*")) if _idx_count(f) == 0]
    if empty:  # well-formed, but nothing in it: not corrupt, and not what the user wants
        return DataError(
            f"{where}: {empty[0]} in {folder} holds no samples (its header counts 0); "
            "put the full file there, or delete it and download again"
        )
    problem = _idx_problems(folder) or f"{type(e).__name__} {e}".strip()
    return DataError(
        f"{where}: corrupt or truncated IDX file in {folder}: {problem}; "
        "delete it and download again"
    )


def _idx_count(path: Path) -> int | None:
    """The sample count of a well-formed IDX file (its first dimension), else None."""
    if not path.is_file() or path.name.endswith(".gz") or idx_problem(path) is not None:
        return None
    return int.from_bytes(path.read_bytes()[4:8], "big")


def _check_content(where: str, num_classes: int, arrays: tuple[Tensor, ...]) -> None:
    """What a dataset's files held that no format check vouches for: both splits there, the
    labels within the dataset's classes, one image size."""
    x_tr, y_tr, x_te, y_te = arrays
    for split, (x, y) in (("train", (x_tr, y_tr)), ("test", (x_te, y_te))):
        _check_split(x, y, num_classes, f"{where}: the {split} split")
    if x_tr.shape[1:] != x_te.shape[1:]:
        sizes = " vs ".join("x".join(map(str, x.shape[2:])) for x in (x_tr, x_te))
        raise DataError(f"{where}: train and test images differ in size ({sizes})")


def _check_split(x: Tensor, y: Tensor, num_classes: int, what: str) -> None:
    """Content the IDX format cannot vouch for: a count, matching lengths, label values."""
    if len(y) == 0:
        raise DataError(f"{what} holds no samples: its IDX files are empty")
    if y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataError(f"{what} has {x.shape[0]} images but {y.shape[0]} labels")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        raise DataError(f"{what} has labels {low}..{high}; this dataset's are 0..{num_classes - 1}")


DATASETS: dict[str, Callable[[str, bool], tuple[Tensor, Tensor, Tensor, Tensor]]] = {
    "digits": _digits,
    "mnist": _torchvision("MNIST"),
    "fashion_mnist": _torchvision("FashionMNIST"),
    "kmnist": _torchvision("KMNIST"),
    "emnist": _torchvision("EMNIST", split="balanced"),
    "qmnist": _torchvision("QMNIST"),
}


# Training-split sizes and class counts, so step plans and the validation split's checks need
# no data on disk (``python -m mnistlab.plan``).
TRAIN_SIZES = {
    "digits": 1437,
    "mnist": 60000,
    "fashion_mnist": 60000,
    "kmnist": 60000,
    "emnist": 112800,
    "qmnist": 60000,
}
NUM_CLASSES = {
    "digits": 10,
    "mnist": 10,
    "fashion_mnist": 10,
    "kmnist": 10,
    "emnist": 47,
    "qmnist": 10,
}

# Image shape (channels, height, width) and class count, so a model can be rebuilt from a
# checkpoint's config without the data (``python -m mnistlab.report``'s weight histogram).
SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "fashion_mnist": ((1, 28, 28), 10),
    "kmnist": ((1, 28, 28), 10),
    "emnist": ((1, 28, 28), 47),
    "qmnist": ((1, 28, 28), 10),
}


@functools.lru_cache(maxsize=4)
def _load_full(name: str, root: str, download: bool, target: str | None, args: str) -> Data:
    """A named dataset's splits, or those your ``dataset._target_`` returns (``args``: its
    keyword arguments as JSON, hashable for the cache)."""
    if target:
        x_tr, y_tr, x_te, y_te = _own_arrays(target, json.loads(args))
        num_classes, where = int(max(y_tr.max(), y_te.max())) + 1, f"dataset._target_={target!r}"
    else:
        x_tr, y_tr, x_te, y_te = DATASETS[name](root, download)
        num_classes = NUM_CLASSES[name]
        where = f"dataset.root={root!r}" if name != "digits" else f"dataset.name={name!r}"
    _check_content(where, num_classes, (x_tr, y_tr, x_te, y_te))
    # Statistics of the whole training split, validation part included: two scalars, so the
    # split changes no sample's values and ``val_size=0`` trains on exactly the same inputs.
    x_tr, x_te, mean, std = _normalize(x_tr, x_te)
    return Data(name, Split(x_tr, y_tr), Split(x_te, y_te), num_classes, mean, std)


def _own_arrays(target: str, args: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``dataset._target_(**dataset.args)``: four tensors (or arrays), train images and
    labels then test images and labels; images ``[N, H, W]`` or ``[N, C, H, W]``, labels
    ``0..K-1``. Images become float32 ``[N, C, H, W]``, labels int64."""
    key = "dataset._target_"
    out = locate(target, key)(**args)
    allowed = "a function returning (train images, train labels, test images, test labels)"
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        raise ConfigError(key, target, f"{allowed}; it returned a {type(out).__name__}")
    x_tr, y_tr, x_te, y_te = (torch.as_tensor(np.asarray(a)) for a in out)
    for x in (x_tr, x_te):
        if x.ndim not in (3, 4):
            raise ConfigError(key, target, f"{allowed}, images [N, H, W] or [N, C, H, W]")
    images = [x.unsqueeze(1) if x.ndim == 3 else x for x in (x_tr, x_te)]
    return images[0].float(), y_tr.long(), images[1].float(), y_te.long()


def _check_limit(limit: int | None, size: int, key: str, name: str) -> int:
    """The samples a ``dataset.limit_*`` keeps of a split of ``size``."""
    if limit is not None and limit > size:
        raise DataError(f"{key}={limit} is larger than {name}'s {size} samples")
    return size if limit is None else limit


def _subset(split: Split, limit: int | None, key: str, name: str) -> Split:
    if _check_limit(limit, len(split), key, name) == len(split):
        return split
    g = torch.Generator().manual_seed(DATA_SEED)
    idx = torch.randperm(len(split), generator=g)[:limit].sort().values
    return Split(split.x[idx], split.y[idx])


def _known(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"dataset.name={name!r} is not allowed: one of {', '.join(DATASETS)}")


def val_count(val_size: Any, n: int, num_classes: int) -> int:
    """The samples ``dataset.val_size`` carves from ``n`` training samples (0: no split): a
    count, or a fraction rounded up as :func:`stratified_split` rounds it. The split is
    stratified, so both parts must be able to hold a sample of every class."""
    if not val_size:
        return 0
    count = val_size if isinstance(val_size, int) else math.ceil(val_size * n)
    if num_classes <= count <= n - num_classes:
        return count
    if n < 2 * num_classes:
        allowed = (
            f"0 or null: {n} training samples are too few for a stratified split "
            f"(each part needs one of each of {num_classes} classes)"
        )
    else:
        allowed = (
            f"a count in [{num_classes}, {n - num_classes}] or a fraction that gives one "
            f"({n} training samples, {num_classes} classes: each part needs one of each), "
            "or 0/null for no split"
        )
    raise ConfigError("dataset.val_size", val_size, allowed)


def train_size(cfg: Any) -> int:
    """The samples a ``dataset`` config node trains on (the plan's N: the training split after
    ``limit_train``, less the validation part), without reading any data (for ``python -m
    mnistlab.plan``; your own ``dataset._target_`` is read): the same checks as :func:`load`."""
    if getattr(cfg, "_target_", None):
        return len(load(cfg).train)
    _known(cfg.name)
    n = _check_limit(cfg.limit_train, TRAIN_SIZES[cfg.name], "dataset.limit_train", cfg.name)
    return n - val_count(cfg.val_size, n, NUM_CLASSES[cfg.name])


def _carve_val(split: Split, val_size: Any, num_classes: int) -> tuple[Split, Split | None]:
    """(training part, validation part): seeded with :data:`DATA_SEED`, stratified by label,
    each part in the split's own order."""
    count = val_count(val_size, len(split), num_classes)
    if count == 0:
        return split, None
    parts = stratified_split(split.y.numpy(), count, DATA_SEED)
    train, val = (torch.as_tensor(np.sort(i)) for i in parts)
    return Split(split.x[train], split.y[train]), Split(split.x[val], split.y[val])


def load(cfg: Any) -> Data:
    """The ``dataset`` config node's data as normalized in-memory tensors: seeded subsets if
    asked, then the validation part carved from the training split."""
    target = getattr(cfg, "_target_", None) or None
    if target is None:
        _known(cfg.name)
    own = getattr(cfg, "args", None) or {}
    args = json.dumps({k: own[k] for k in own}, sort_keys=True, default=str)
    source = (cfg.name, str(cfg.root), bool(cfg.download), target, args)
    return _load(source, cfg.limit_train, cfg.limit_test, cfg.val_size)


@functools.lru_cache(maxsize=4)
def _load(
    source: tuple[str, str, bool, str | None, str], limit_train: int | None,
    limit_test: int | None, val_size: float | int | None,
) -> Data:  # fmt: skip
    """Cached: the jobs of a sweep in one process (a stacked group at once) share one copy.
    ``source``: :func:`_load_full`'s arguments."""
    full = _load_full(*source)
    name = full.name
    train = _subset(full.train, limit_train, "dataset.limit_train", name)
    train, val = _carve_val(train, val_size, full.num_classes)
    test = _subset(full.test, limit_test, "dataset.limit_test", name)
    return Data(full.name, train, test, full.num_classes, full.mean, full.std, val)
