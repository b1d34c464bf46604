"""Every user mistake fails before training: one ``error:`` line naming the key, the value
and what is allowed, a non-zero exit, no traceback and no W&B run left behind."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from mnistlab.config import DatasetConfig
from mnistlab.engine import data

from support import app, assert_one_line_error, write_mnist_layout


def corrupt(root: Path, how: str) -> Path:
    """A copy of a small MNIST layout with one file broken the way ``how`` says."""
    raw = write_mnist_layout(root, "MNIST", n_train=60, n_test=20)
    images, labels = raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte"
    if how == "image-magic":  # a labels header (1 dimension) on the images file
        images.write_bytes(struct.pack(">I", 0x0801) + images.read_bytes()[4:])
    elif how == "label-type":  # int32 labels: a valid IDX type torchvision refuses for labels
        labels.write_bytes(struct.pack(">I", 0x0C01) + labels.read_bytes()[4:])
    elif how == "images-short":
        images.write_bytes(images.read_bytes()[:-100])
    elif how == "labels-short":
        labels.write_bytes(labels.read_bytes()[:-7])
    elif how == "empty":
        images.write_bytes(b"")
    return root


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("image-magic", "train-images-idx3-ubyte has magic number 0x00000801"),
        ("label-type", "train-labels-idx1-ubyte is truncated: 68 bytes, its header (60) says 248"),
        ("images-short", "train-images-idx3-ubyte is truncated: 46956 bytes"),
        ("labels-short", "train-labels-idx1-ubyte is truncated: 61 bytes"),
        ("empty", "train-images-idx3-ubyte has magic number 0x00000000"),
    ],
)
def test_corrupt_idx_names_file_and_fault(tmp_path: Path, how: str, expected: str) -> None:
    root = corrupt(tmp_path, how)
    with pytest.raises(data.DataError) as e:
        data.load(DatasetConfig("mnist", str(root), download=False))
    msg = str(e.value)
    assert expected in msg and str(root / "MNIST" / "raw") in msg and "\n" not in msg


def test_idx_problem_accepts_good_files(mnist_root: Path) -> None:
    raw = mnist_root / "MNIST" / "raw"
    assert [data.idx_problem(p) for p in sorted(raw.iterdir())] == [None] * 4


# (overrides, what the one line must contain: the key, the value, what is allowed)
CASES = {
    "unknown choice": (["model=foo"], ["model='foo'", "one of cnn, lenet, mlp"]),
    "unknown key": (["trainer.batch_sz=3"], ["trainer.batch_sz", "batch_size"]),
    "appended unknown key": (["+trainer.typo=1"], ["trainer.typo=1", "no such key"]),
    "unknown group": (["modle=mlp"], ["modle", "one of dataset, model"]),
    "wrong type int": (["trainer.batch_size=abc"], ["trainer.batch_size=abc", "Integer"]),
    "wrong type bool": (["trainer.drop_last=maybe"], ["trainer.drop_last=maybe", "bool"]),
    "bad override syntax": (["trainer.batch_size=["], ["trainer.batch_size=["]),
    "batch size": (["trainer.batch_size=0"], ["trainer.batch_size=0", ">= 1"]),
    "grad accum": (["trainer.grad_accum=0"], ["trainer.grad_accum=0", ">= 1"]),
    "devices": (["trainer.devices=0"], ["trainer.devices=0", ">= 1"]),
    "epochs": (["trainer.epochs=0"], ["trainer.epochs=0", ">= 1"]),
    "bn momentum 0": (["model.bn_momentum=0"], ["model.bn_momentum=0", "(0, 1]"]),
    "bn momentum big": (["model.bn_momentum=1.5"], ["model.bn_momentum=1.5", "(0, 1]"]),
    "dropout 1": (["regularizer.dropout=1.0"], ["regularizer.dropout=1.0", "[0, 1)"]),
    "dropout negative": (["regularizer.dropout=-0.1"], ["regularizer.dropout=-0.1", "[0, 1)"]),
    "negative l1": (["regularizer.l1=-1"], ["regularizer.l1=-1", ">= 0"]),
    "negative l2": (["regularizer.l2=-0.5"], ["regularizer.l2=-0.5", ">= 0"]),
    "sweep with unknown choice": (
        ["-m", "model=mlp,foo"],
        ["model='foo'", "one of cnn, lenet, mlp"],
    ),
    # every number finite and in range, whatever the key
    "nan lr": (["optimizer.lr=nan"], ["optimizer.lr=nan", "finite number > 0"]),
    "inf lr": (["optimizer.lr=inf"], ["optimizer.lr=inf", "finite number > 0"]),
    "nan l1": (["regularizer=l1", "regularizer.l1=nan"], ["regularizer.l1=nan", "finite"]),
    "inf l2": (["regularizer.l2=inf"], ["regularizer.l2=inf", "finite number >= 0"]),
    "momentum 1": (["optimizer.momentum=1.0"], ["optimizer.momentum=1.0", "[0, 1)"]),
    "adam beta": (
        ["optimizer=adam", "optimizer.betas=[0.9,1.5]"],
        ["optimizer.betas[1]=1.5", "[0, 1)"],
    ),
    "negative seed": (["trainer.seed=-1"], ["trainer.seed=-1", "integer in [0, "]),
    "hidden width": (["model.hidden=[64,0]"], ["model.hidden[1]=0", ">= 1"]),
    "decoupled decay too strong": (
        ["regularizer.l2_mode=decoupled", "regularizer.l2=100"],
        ["regularizer.l2=100", "1/optimizer.lr = 20"],
    ),
    "wandb project name": (["logger.wandb.project=a/b"], ["logger.wandb.project='a/b'", "/"]),
    "preset without +": (["experiment=bn_momentum"], ["experiment", "+experiment=bn_momentum"]),
    "joblib n_jobs 0": (
        ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=0"],
        ["hydra.launcher.n_jobs=0", "negative to count back"],
    ),
    "stacked max_group 0": (
        ["-m", "hydra/launcher=stacked", "hydra.launcher.max_group=0", "trainer.seed=0,1"],
        ["hydra.launcher.max_group=0", ">= 1"],
    ),
    "unknown callback": (
        ["+callbacks.x._target_=no.such.Thing"],
        ["callbacks.x._target_='no.such.Thing'"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_mistake_is_one_line(case: str, tmp_path: Path) -> None:
    overrides, needles = CASES[case]
    run_dir = tmp_path / "run"
    if overrides[0] == "-m":  # a sweep: Hydra wants the flag before the overrides
        p = app(run_dir, *overrides[1:], multirun=True)
    else:
        p = app(run_dir, *overrides)
    assert_one_line_error(p, *needles)
    assert not list(tmp_path.rglob("wandb")) and not list(tmp_path.rglob("metrics.jsonl"))


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["dataset.limit_train=5000"], ["dataset.limit_train=5000", "1437 samples"]),
        (
            ["trainer.batch_size=2000", "trainer.drop_last=true"],
            ["trainer.batch_size=2000", "at most 1293", "drop_last"],  # 1437 less validation
        ),
        (["trainer.resume=true"], ["trainer.resume=True", "no checkpoint at"]),
        # 1293 = 4 x 323 + 1 (the digits less their validation part): the last micro-batch
        # would hold one sample, which BatchNorm cannot normalize in training
        (["trainer.batch_size=4"], ["trainer.batch_size=4", "BatchNorm", "drop_last=true"]),
        # 1113 less its 10% validation part (112) is 1001 = 100 x 10 + 1
        (["dataset.limit_train=1113", "trainer.batch_size=100"], ["trainer.batch_size=100"]),
        (["trainer.devices=2", "trainer.batch_size=2"], ["rank", "trainer.batch_size=2"]),
    ],
    ids=[
        "limit_train too large",
        "batch larger than shard",
        "resume without checkpoint",
        "one-sample last batch",
        "one-sample last batch of a subset",
        "one-sample last batch of two shards",
    ],
)
def test_data_dependent_mistake_is_one_line(
    overrides: list[str], needles: list[str], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    p = app(tmp_path, *overrides, "trainer.num_threads=1")
    assert_one_line_error(p, *needles)
    # ranks the app spawned (trainer.devices=2) write to this process's descriptors instead
    ranks = capfd.readouterr()
    assert "Traceback" not in ranks.out + ranks.err and "error:" not in ranks.out + ranks.err
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("how", ["missing", "image-magic", "images-short"])
def test_bad_dataset_files_are_one_line(how: str, tmp_path: Path) -> None:
    root = tmp_path / "data"
    if how == "missing":
        root.mkdir()
    else:
        corrupt(root, how)
    run_dir = tmp_path / "run"
    p = app(run_dir, "dataset=mnist", f"dataset.root={root}", "dataset.download=false")
    line = assert_one_line_error(p, f"dataset.root='{root}'", str(root / "MNIST" / "raw"))
    assert ("not found" in line) if how == "missing" else ("train-images-idx3-ubyte" in line)
    assert not (run_dir / "wandb").exists() and not (run_dir / "metrics.jsonl").exists()
    shutil.rmtree(root)


def test_a_bad_value_met_while_resolving_is_one_line(tmp_path: Path) -> None:
    """``+experiment=step_accounting`` derives the batch from grad_accum through a resolver."""
    p = app(
        tmp_path / "run",
        "+experiment=step_accounting",
        "hydra.mode=RUN",
        "trainer.grad_accum=3",
        "logger=none",
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr + p.stdout
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert errors == ["error: trainer.grad_accum=3 is not allowed: a divisor of 128"]
