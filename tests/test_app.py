"""The Hydra app end to end, on the bundled digits and generated IDX files, called in this
process (:func:`support.app`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnistlab import plan as plan_command

from support import app, read_jsonl, read_summary

FAST = ("trainer.epochs=2", "trainer.num_threads=1", "logger=none")


def test_run_writes_files_and_counts_match_plan(tmp_path: Path) -> None:
    run = tmp_path / "run"
    p = app(run, *FAST, "trainer.grad_accum=3", "trainer.batch_size=50")
    assert p.returncode == 0, p.stderr
    for name in ("train.log", "metrics.jsonl", "summary.json", ".hydra/config.yaml"):
        assert (run / name).is_file(), name
    rows = read_jsonl(run / "metrics.jsonl")
    assert rows and all(
        {"optimizer_step", "micro_batch", "epoch", "samples_seen"} <= row.keys() for row in rows
    )
    s = read_summary(run)
    assert s["status"] == "completed" and s["accounting_matches_plan"] is True
    plan = s["plan"]
    # 1437 digits less 144 for validation = 1293, batch 50: 26 micro-batches (last holds 43),
    # windows of 3 (the last of 2) -> 9 steps an epoch
    assert (plan["micro_batches_per_epoch"], plan["steps_per_epoch"]) == (26, 9)
    assert s["counted"]["total_steps"] == plan["total_steps"] == 18
    assert s["counted"]["total_micro_batches"] == 52
    assert rows[-1]["optimizer_step"] == 18 and rows[-1]["samples_seen"] == 2 * 1293
    assert "Running training" in (run / "train.log").read_text()


# What `make train` runs, the default job, reaches 95% in under a minute from the process's
# start: test_cli's console scripts train it.


def test_same_seed_gives_identical_metrics(tmp_path: Path) -> None:
    args = (*FAST, "trainer.grad_accum=2", "regularizer=dropout", "trainer.seed=7")
    # two runs in one process: the second starts from whatever random state the first left
    a, b = app(tmp_path / "a", *args), app(tmp_path / "b", *args)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    rows = read_jsonl(tmp_path / "a/metrics.jsonl")
    assert any("bn/gap_mean" in r for r in rows)  # the BN measurements are compared too
    assert (tmp_path / "a/metrics.jsonl").read_text() == (tmp_path / "b/metrics.jsonl").read_text()
    other = app(tmp_path / "c", *FAST, "trainer.grad_accum=2", "trainer.seed=8")
    assert (tmp_path / "c/metrics.jsonl").read_text() != (tmp_path / "a/metrics.jsonl").read_text()
    assert other.returncode == 0


BAD = [
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.grad_accum=0", "trainer.grad_accum"),
    ("trainer.devices=0", "trainer.devices"),
    ("trainer.epochs=0", "trainer.epochs"),
    ("model.bn_momentum=0", "model.bn_momentum"),
    ("model.bn_momentum=1.5", "model.bn_momentum"),
    ("regularizer.dropout=1.0", "regularizer.dropout"),
    ("regularizer.l2=-1", "regularizer.l2"),
    ("dataset.limit_train=5000", "dataset.limit_train"),
    ("trainer.num_threads=many", "trainer.num_threads"),
]


@pytest.mark.parametrize(("override", "key"), BAD)
def test_range_errors_are_one_line(tmp_path: Path, override: str, key: str) -> None:
    p = app(tmp_path / "run", *FAST, override)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr + p.stdout
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and key in errors[0], p.stderr
    assert read_summary(tmp_path / "run")["status"] == "failed"


def test_batch_larger_than_shard_with_drop_last(tmp_path: Path) -> None:
    p = app(
        tmp_path / "run",
        *FAST,
        "dataset.limit_train=100",
        "trainer.batch_size=101",
        "trainer.drop_last=true",
    )
    assert p.returncode != 0 and "trainer.batch_size=101" in p.stderr
    assert "Traceback" not in p.stderr


def test_torchvision_dataset_through_the_app(tmp_path: Path, mnist_root: Path) -> None:
    p = app(
        tmp_path / "run",
        *FAST,
        "dataset=fashion_mnist",
        f"dataset.root={mnist_root}",
        "dataset.download=false",
        "model=cnn",
        "trainer.batch_size=64",
        "model.bn_momentum=0.01",
    )
    assert p.returncode == 0, p.stderr
    s = read_summary(tmp_path / "run")
    assert s["plan"]["num_samples"] == 540 and s["accounting_matches_plan"]  # 600 less 60
    assert s["final"]["test/acc"] > 0.5  # the generated classes are easy to tell apart


def test_missing_dataset_is_one_line(tmp_path: Path) -> None:
    p = app(
        tmp_path / "run",
        *FAST,
        "dataset=mnist",
        f"dataset.root={tmp_path}/none",
        "dataset.download=false",
    )
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "dataset.download=true" in p.stderr and "MNIST/raw" in p.stderr


def test_cfg_job_and_help(tmp_path: Path) -> None:
    p = app(tmp_path / "run", "model=cnn", "trainer.grad_accum=4", flags=("--cfg", "job"))
    assert p.returncode == 0
    assert "grad_accum: 4" in p.stdout and "name: cnn" in p.stdout
    h = app(tmp_path / "run", flags=("--help",))
    assert h.returncode == 0
    for group in ("dataset", "model", "regularizer", "optimizer", "trainer", "logger"):
        assert group in h.stdout


@pytest.mark.slow
def test_multirun_writes_one_folder_per_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    p = app(sweep, *FAST, "trainer.grad_accum=1,2", multirun=True)
    assert p.returncode == 0, p.stderr
    steps = sorted(read_summary(sweep / str(i))["counted"]["total_steps"] for i in (0, 1))
    assert steps == [42, 82]  # 1293 training digits at batch 32: 41 micro-batches an epoch
    assert (sweep / "sweep_summary.csv").is_file()


def test_plan_cli(capsys: pytest.CaptureFixture[str]) -> None:
    def plan(*args: str) -> tuple[int, str, str]:
        code = plan_command.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    # 1000 samples less the validation part (100): N = 900
    code, out, _ = plan("dataset.limit_train=1000", "trainer.batch_size=100", "trainer.epochs=1")
    assert code == 0
    assert "Num examples (N)                      = 900" in out
    assert "Iterations (micro-batches) per epoch  = 9" in out
    assert "Optimizer steps per epoch             = 9" in out
    _, out, _ = plan(
        "dataset.limit_train=1000",
        "trainer.batch_size=100",
        "trainer.epochs=1",
        "trainer.grad_accum=2",
    )
    assert "Optimizer steps per epoch             = 5" in out  # windows 2,2,2,2,1
    _, out, _ = plan(
        "dataset=mnist",
        "trainer.batch_size=64",
        "trainer.epochs=10",
        "trainer.devices=8",
        "trainer.num_nodes=2",
    )
    assert "World size (devices)                  = 16" in out
    # 54000 to train (6000 validate): ceil(3375/64) = 53 per epoch
    assert "Total optimizer steps                 = 530" in out
    code, _, err = plan("trainer.nope=1")
    assert code == 2 and err.count("\n") == 1 and "trainer.nope" in err
