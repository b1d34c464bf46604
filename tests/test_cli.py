"""The commands a user types: the console scripts from any folder (editable install and a
plain ``pip install .``), Hydra's tab completion through them, the app's ``--help``, and the
``debug`` presets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mnistlab.config import CONF_DIR, register, validate

from support import ROOT, app, read_jsonl, read_summary

SCRIPTS = (
    "mnistlab-train",
    "mnistlab-plan",
    "mnistlab-compare",
    "mnistlab-eval",
    "mnistlab-report",
)


def script(name: str, bindir: Path | None = None) -> str:
    """The console script installed beside this interpreter (or in ``bindir``)."""
    found = shutil.which(name, path=str(bindir or Path(sys.executable).parent))
    assert found, f"{name} is not installed"
    return found


def call(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_console_scripts_installed() -> None:
    for name in SCRIPTS:
        script(name)


@pytest.mark.slow
def test_console_scripts_work_from_any_folder(tmp_path: Path) -> None:
    """Train, plan, compare and evaluate from a folder that has no conf/ and no src/. The
    training is the default job (W&B off so the suite never needs the network): it reaches
    95% in under a minute, counted from the process's start (``wall_s`` includes the
    start-up)."""
    env = dict(os.environ, WANDB_SILENT="true")
    train = call([script("mnistlab-train"), "logger=none"], tmp_path, env)
    assert train.returncode == 0, train.stderr
    (run,) = (p.parent for p in (tmp_path / "outputs" / "runs").rglob("summary.json"))
    summary = read_summary(run)
    assert summary["status"] == "completed" and summary["counted"]["epochs"] == 20
    assert summary["final"]["test/acc"] >= 0.95
    assert summary["timings"]["wall_s"] < 60

    plan = call([script("mnistlab-plan"), "dataset.limit_train=1000", "trainer.batch_size=100"],
                tmp_path, env)  # fmt: skip
    assert plan.returncode == 0, plan.stderr
    assert "Optimizer steps per epoch             = 9" in plan.stdout  # N = 1000 less 10% for val

    compare = call([script("mnistlab-compare"), str(run)], tmp_path, env)
    assert compare.returncode == 0, compare.stderr
    assert "completed" in compare.stdout

    ev = call([script("mnistlab-eval"), str(run)], tmp_path, env)
    assert ev.returncode == 0, ev.stderr
    report = json.loads((run / "eval.json").read_text())
    assert report["metrics"]["test/acc"] == summary["final"]["test/acc"]


def test_tab_completion_through_the_console_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hydra's bash completion: the install snippet names the script; queries (the same app,
    called here in this process) complete keys, group options and the debug presets, whatever
    the current folder."""
    train = script("mnistlab-train")
    install = call([train, "-sc", "install=bash"], tmp_path)
    assert install.returncode == 0, install.stderr
    assert "complete -o nospace -o default -F hydra_bash_completion mnistlab-train" in (
        install.stdout
    )
    monkeypatch.chdir(tmp_path)

    def query(line: str) -> list[str]:
        env = {"COMP_LINE": f"mnistlab-train {line}", "COMP_POINT": "0"}
        p = app(tmp_path / "run", flags=("-sc", "query=bash"), env=env)
        assert p.returncode == 0, p.stderr
        return p.stdout.split()

    assert "trainer.batch_size=" in query("trainer.ba")
    assert {"trainer.epochs=", "trainer.grad_accum="} <= set(query("trainer."))
    assert query("model=") == ["model=cnn", "model=lenet", "model=mlp"]
    assert "+debug=overfit" in query("+debug=")


def test_help_names_groups_keys_and_examples(tmp_path: Path) -> None:
    p = app(tmp_path / "run", "trainer.epochs=7", "+debug=fast", flags=("--help",))
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "Powered by Hydra" not in out  # mnistlab's own help, not Hydra's generic text
    for line in (
        "debug: default, fast, limit, overfit",
        "model: cnn, lenet, mlp",
        "regularizer: dropout, elastic, l1, l2, none",
        "experiment: bn_momentum, regularizers, step_accounting",
    ):
        assert line in out
    # the keys with the values this command would use: its overrides and preset included
    assert "trainer.epochs=7 trainer.batch_size=32 trainer.grad_accum=1" in out
    assert "bn_stats.recalibrate=False" in out
    examples = [ln.strip() for ln in out.split("== Examples ==")[1].splitlines() if ln.strip()]
    assert len([e for e in examples if e.startswith("python -m mnistlab.train")]) == 3


def _compose(*overrides: str, hydra: bool = False):  # type: ignore[no-untyped-def]
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)
    if not hydra:
        validate(cfg)
    return cfg


def test_debug_presets_compose() -> None:
    # debug runs land in their own folders, never among the real ones
    debug = _compose("+debug=fast", hydra=True).hydra
    assert debug.run.dir.startswith("outputs/debug/")
    assert debug.sweep.dir.startswith("outputs/debug/multirun/")
    assert _compose(hydra=True).hydra.run.dir.startswith("outputs/runs/")
    fast = _compose("+debug=fast")
    assert (fast.trainer.epochs, fast.dataset.limit_train, fast.logger.name) == (1, 356, "none")
    assert fast.bn_stats.every_n_steps == 5
    overfit = _compose("+debug=overfit", "trainer.batch_size=16")
    assert overfit.dataset.limit_train == 16  # one batch, whatever its size
    assert overfit.trainer.epochs == 100 and overfit.logger.name == "none"
    limit = _compose("+debug=limit", "dataset=mnist")
    assert (limit.trainer.epochs, limit.dataset.limit_train) == (3, 1000)
    assert limit.dataset.name == "mnist"
    assert _compose("+debug=fast", "logger=wandb").logger.name == "wandb"  # the user's word wins


def test_debug_fast_is_one_short_epoch_without_wandb(tmp_path: Path) -> None:
    run = tmp_path / "run"
    p = app(run, "+debug=fast", "trainer.num_threads=1")
    assert p.returncode == 0, p.stderr
    s = read_summary(run)
    assert s["status"] == "completed" and s["accounting_matches_plan"]
    assert s["counted"]["epochs"] == 1 and s["counted"]["samples_seen"] == 320
    assert s["config"]["logger"]["name"] == "none" and not (run / "wandb").exists()
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["optimizer_step"] for r in rows if "bn/gap_mean" in r] == [5, 10]


@pytest.mark.slow
def test_debug_overfit_drives_the_loss_to_zero(tmp_path: Path) -> None:
    run = tmp_path / "run"
    p = app(run, "+debug=overfit", "trainer.num_threads=1")
    assert p.returncode == 0, p.stderr
    s = read_summary(run)
    assert s["plan"]["num_samples"] == 32 and s["counted"]["total_steps"] == 100
    losses = [r["train/loss"] for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r]
    assert losses[0] > 0.5  # it starts far from the answer ...
    assert losses[-1] < 0.01 and s["final"]["train_eval/loss"] < 0.01  # ... and learns the batch
    assert s["final"]["train_eval/acc"] == 1.0
    assert "train/loss" not in s["final"]  # the running mean in train mode: rows only


def _fresh_venv(where: Path) -> Path:
    """A venv with no packages of its own that sees this interpreter's (torch, Hydra, pip,
    setuptools) through .pth lines: nothing is downloaded, and mnistlab is not importable
    (an editable install's own .pth is not read from a folder a .pth line names)."""
    venv.EnvBuilder(with_pip=False).create(where)
    python = where / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    ours = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (Path(site) / "_outer.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


@pytest.mark.slow
def test_a_plain_pip_install_finds_its_configs_from_any_folder(tmp_path: Path) -> None:
    """``pip install .`` (no editable install): conf/ ships inside the wheel."""
    pytest.importorskip("setuptools", reason="--no-build-isolation builds with this setuptools")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("src", "conf"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    python = _fresh_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the wheel, not src/
    pip = [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
    installed = call([*pip, str(source)], tmp_path, env)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    bindir = tmp_path / "venv" / "bin"
    where = call([python, "-c", "import mnistlab.config as c; print(c.CONF_DIR)"], elsewhere, env)
    conf = Path(where.stdout.strip())
    assert conf.is_relative_to(tmp_path / "venv") and (conf / "debug" / "fast.yaml").is_file()
    job = call([script("mnistlab-train", bindir), "--cfg", "job", "+debug=fast"], elsewhere, env)
    assert job.returncode == 0, job.stderr
    assert "limit_train: 356" in job.stdout and "name: none" in job.stdout
    plan = call([script("mnistlab-plan", bindir), "trainer.epochs=2"], elsewhere, env)
    assert plan.returncode == 0, plan.stderr
    # 41 steps an epoch: the 1293 training digits (1437 less the validation part) at batch 32
    assert "Total optimizer steps                 = 82" in plan.stdout
