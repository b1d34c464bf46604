"""Checks before any work, and readers that do not fall over: each case of a kind that used to
end in a traceback, a wasted run or silence now ends in one line naming the key (or the
variable, or the file), the value and what is allowed; ``plan`` refuses exactly what
``train`` refuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mnistlab import compare, plan
from mnistlab.results import curves, folders

from support import (
    ROOT,
    app,
    assert_one_line_error,
    no_credentials_env,
    run_app,
    write_mnist_layout,
)

FAST = ("trainer.epochs=1", "logger=none", "trainer.progress=none", "trainer.num_threads=1")

# (overrides, what the one line must hold): refused by the config check, before any work
REFUSED = {
    "one beta": (
        ["optimizer.name=adam", "optimizer.betas=[0.9]"],
        ["optimizer.betas=[0.9]", "two"],
    ),
    "three betas": (["optimizer.betas=[0.9,0.99,0.999]"], ["optimizer.betas", "exactly two"]),
    "nesterov without momentum": (
        ["optimizer.nesterov=true", "optimizer.momentum=0"],
        ["optimizer.nesterov=True", "momentum > 0"],
    ),
    "l1 that zeroes every weight": (["regularizer.l1=1e300"], ["regularizer.l1=1e+300", "< 1/"]),
    "l2 penalty that flips every weight": (["regularizer.l2=40"], ["regularizer.l2=40", "< 1/"]),
    "a model larger than memory": (
        ["model.hidden=[2147483648]"],
        ["model.hidden=[2147483648]", "GB are free"],
    ),
    "more ranks than samples": (["trainer.devices=1500"], ["trainer.devices=1500", "at most 1292"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_train_and_plan_refuse_it_in_one_line(tmp_path: Path, case: str, capsys: Any) -> None:
    overrides, needles = REFUSED[case]
    p = app(tmp_path / "run", *overrides, *FAST)
    line = assert_one_line_error(p, *needles)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any work
    assert plan.main(list(overrides)) == 2
    same = capsys.readouterr().err.strip()
    assert same.rsplit(",", 1)[0] == line.rsplit(",", 1)[0]  # the same blame (free memory moves)


def test_a_model_too_deep_for_the_images_is_refused_before_a_checkpoint(tmp_path: Path) -> None:
    """cnn on 3x3-pixel IDX images: two 2x2 poolings leave nothing. The shape is known only
    once the files are read; the model's one forward at build refuses it there."""
    write_mnist_layout(tmp_path / "data", "MNIST", n_train=200, n_test=20, size=3)
    data = ("dataset=mnist", f"dataset.root={tmp_path / 'data'}", "dataset.download=false")
    p = app(tmp_path / "run", *data, "model=cnn", *FAST)
    assert_one_line_error(p, "model.name='cnn'", "[B, 1, 3, 3]", "forward failed")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_sweep_of_no_value_is_one_line_not_zero_jobs(tmp_path: Path) -> None:
    p = app(tmp_path / "sweep", "trainer.seed=range(0)", *FAST, multirun=True)
    assert_one_line_error(p, "trainer.seed='range(0)'", "at least one value")
    assert not (tmp_path / "sweep").exists()


def test_wandb_online_from_the_environment_without_a_key(tmp_path: Path) -> None:
    """A subprocess: W&B reads its environment once per process."""
    env = dict(no_credentials_env(tmp_path), WANDB_MODE="online")
    p = run_app(tmp_path / "run", *FAST, "logger=wandb", env=env)
    assert_one_line_error(p, "logger.wandb.mode='auto (WANDB_MODE=online)'", "wandb login")
    assert not (tmp_path / "run" / "wandb").exists()


def test_a_wandb_variable_wandb_refuses_is_one_line(tmp_path: Path) -> None:
    env = dict(no_credentials_env(tmp_path), WANDB_MODE="")  # set, but empty
    p = run_app(tmp_path / "run", *FAST, "logger=wandb", env=env)
    assert_one_line_error(p, "W&B refuses its settings from the environment", "mode")


def test_a_bad_distributed_timeout_names_its_variable(tmp_path: Path) -> None:
    env = {"MNISTLAB_DIST_TIMEOUT_S": "abc"}
    p = app(tmp_path / "run", "trainer.devices=2", *FAST, env=env)
    assert_one_line_error(p, "MNISTLAB_DIST_TIMEOUT_S='abc'", "seconds > 0")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real jobs, then a third folder whose summary.json has the wrong shape."""
    where = tmp_path_factory.mktemp("readers") / "sweep"
    p = app(where, "optimizer.lr=0.02,0.05", "+debug=fast", *FAST, multirun=True)
    assert p.returncode == 0, p.stderr[-3000:]
    (where / "2").mkdir()
    (where / "2" / "summary.json").write_text(json.dumps({"status": 1, "final": [0.5]}))
    return where


def test_a_summary_of_the_wrong_shape_is_skipped_with_one_warning(sweep: Path, capsys: Any) -> None:
    assert folders.shape_problem({"final": [0.5]}) == "final is a list, not a dict"
    assert compare.main([str(sweep)]) == 0
    out, err = capsys.readouterr()
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and str(sweep / "2") in warnings[0], err
    assert "Traceback" not in err and out.count("completed") == 2


def test_plotting_a_metric_logged_only_as_nan_says_so(sweep: Path) -> None:
    for job in ("0", "1"):
        with (sweep / job / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"optimizer_step": 99, "epoch": 9, "x/nan": None}) + "\n")
    with pytest.raises(folders.CompareError, match="every value logged is NaN or infinite"):
        curves.plot([sweep / "0", sweep / "1"], "x/nan")


def test_compare_into_a_closed_pipe_ends_quietly(sweep: Path, tmp_path: Path) -> None:
    """``compare ... | head -1``: the reader leaves early; no BrokenPipeError traceback. Many
    runs, so the table is larger than the pipe holds and the write meets the closed end."""
    summary = (sweep / "0" / "summary.json").read_text()
    for i in range(2000):
        (tmp_path / "many" / str(i)).mkdir(parents=True)
        (tmp_path / "many" / str(i) / "summary.json").write_text(summary)
    cmd = f"{sys.executable} -m mnistlab.compare {tmp_path / 'many'} --runs | head -1"
    p = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.stdout.count("\n") == 1
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr[-2000:]


def test_train_refuses_what_plan_refuses_through_the_subprocess_too(tmp_path: Path) -> None:
    """The process boundary of the real command: exit code 2 and the line, nothing else."""
    p = run_app(tmp_path / "run", "optimizer.betas=[0.9]", *FAST)
    assert_one_line_error(p, "optimizer.betas=[0.9]")
