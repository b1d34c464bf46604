"""Sweeps, W&B and the local comparison, end to end with the real Hydra, W&B and matplotlib.

The sweeps run in this process (:func:`support.app`), W&B offline (no credentials in the jobs'
environment and ``WANDB_MODE=offline``; how ``mode=auto`` follows credentials is checked in a
fresh process below), read back with W&B's own reader of the run file, ``wandb leet inspect``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf
from omegaconf import OmegaConf

from mnistlab import compare
from mnistlab.config import CONF_DIR, register
from mnistlab.core.errors import ConfigError
from mnistlab.engine.steps import Cadence, StepPlan
from mnistlab.logger import sinks
from mnistlab.plan import main as plan_main
from mnistlab.plan import plan_from_overrides
from mnistlab.processes.threads import parallel_jobs
from mnistlab.results import curves, folders

from support import ROOT, app, leet, no_credentials_env, read_jsonl, read_summary, wandb_run_dir


def sweep(
    sweep_dir: Path, *overrides: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return app(sweep_dir, *overrides, env=env, multirun=True)


COMMON = ("trainer.epochs=2", "trainer.num_threads=1")


@pytest.fixture(scope="module")
def ok_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """Two jobs on the default data and the default logger (W&B, mode auto)."""
    tmp = tmp_path_factory.mktemp("ok")
    proc = sweep(tmp / "sweep", *COMMON, "optimizer.lr=0.02,0.05", env=no_credentials_env(tmp))
    return tmp / "sweep", proc


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """Two jobs; the second diverges at once (lr=1e30 makes the loss NaN)."""
    tmp = tmp_path_factory.mktemp("fail")
    proc = sweep(tmp / "sweep", *COMMON, "optimizer.lr=0.05,1e30", env=no_credentials_env(tmp))
    return tmp / "sweep", proc


@pytest.mark.slow
def test_sweep_jobs_are_offline_wandb_runs_grouped_by_configuration(
    ok_sweep: tuple[Path, Any],
) -> None:
    sweep_dir, proc = ok_sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [sweep_dir / str(i) for i in range(2)]
    groups, names = [], set()
    for job, lr in zip(jobs, (0.02, 0.05), strict=True):
        s = read_summary(job)
        assert s["status"] == "completed"
        run = wandb_run_dir(job)
        records = leet(run)
        (info,) = [r["run"] for r in records if r["type"] == "run"]
        groups.append(info["run_group"])
        names.add(info["display_name"])
        assert info["job_type"] == "train"
        assert info["display_name"] == f"optimizer.lr={lr}"  # only what the sweep varies
        metrics = {
            r["metric"].get("name") or r["metric"].get("glob_name"): r["metric"]
            for r in records
            if r["type"] == "metric"
        }
        assert {"optimizer_step", "samples_seen"} <= set(metrics)
        assert metrics["*"]["step_metric"] == "optimizer_step"
        history = [r["history"] for r in records if r["type"] == "history"]
        # one row at the end holds the tables, the chart and the pictures (flattened keys)
        (media,) = [h for h in history if "accounting/plan._type" in h["item"]]
        history.remove(media)
        rows = read_jsonl(job / "metrics.jsonl")
        total = s["plan"]["total_steps"]
        trained = [r["optimizer_step"] for r in rows if "train/loss" in r]
        cadence = Cadence.of(total)
        assert all(step % cadence.row_every == 0 for step in trained[:-1])
        every = cadence.wandb_every  # 90 steps: every row, 10 steps apart
        sent = [r for r in rows if r["optimizer_step"] % every == 0 or "test/acc" in r
                or "bn/gap_mean" in r]  # fmt: skip
        assert len(history) == len(sent) and trained[-1] == total

        state = leet(run, "--summary")
        assert state["state"] == "finished" and state["exit_code"] == 0
        assert state["config"]["optimizer"]["lr"] == lr
        assert f"optimizer.lr={lr}" in state["config"]["overrides"]
        assert state["config"]["plan"]["total_steps"] == s["plan"]["total_steps"]
        assert state["summary"]["test/acc"]["last"] == pytest.approx(s["final"]["test/acc"])
        assert state["summary"]["status"] == "completed"
        assert state["summary"]["counted/total_steps"] == s["counted"]["total_steps"]
    # one group per configuration: the job's overrides less what changes nothing trained
    assert groups == [f"trainer.epochs=2,optimizer.lr={lr}" for lr in (0.02, 0.05)]
    assert len(names) == 2
    assert "wandb sync" in proc.stdout + proc.stderr  # how to upload the offline runs later
    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    assert [r["status"] for r in rows] == ["completed"] * 2


@pytest.mark.slow
def test_a_failed_job_is_failed_in_summary_wandb_and_sweep(failing_sweep: tuple[Path, Any]) -> None:
    sweep_dir, proc = failing_sweep
    assert proc.returncode != 0  # as Hydra does when a job fails
    good, bad = read_summary(sweep_dir / "0"), read_summary(sweep_dir / "1")
    assert good["status"] == "completed" and good["final"]["test/acc"] > 0.5
    # "failed" (a loop that reports divergence as its own status may say "diverged")
    assert bad["status"] in ("failed", "diverged") and "loss became" in bad["error"]

    ok_state = leet(wandb_run_dir(sweep_dir / "0"), "--summary")
    bad_state = leet(wandb_run_dir(sweep_dir / "1"), "--summary")
    assert (ok_state["state"], ok_state["exit_code"]) == ("finished", 0)
    assert (bad_state["state"], bad_state["exit_code"]) == ("failed", 1)
    assert bad_state["summary"]["status"] == bad["status"]
    assert "loss became" in bad_state["summary"]["error"]

    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    assert [(r["optimizer.lr"], r["status"]) for r in rows] == [
        ("0.05", "completed"),
        ("1e+30", bad["status"]),
    ]


@pytest.mark.slow
def test_compare_table_csv_and_plot(
    failing_sweep: tuple[Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep_dir, _ = failing_sweep
    out_csv, png = tmp_path / "runs.csv", tmp_path / "loss.png"
    code = compare.main(
        [str(sweep_dir), "--csv", str(out_csv), "--plot", "train/loss", "--out", str(png)]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:3] == ["run", "optimizer.lr", "status"]  # only the override that differs
    # the objective (val/acc) beside status, validation before test
    assert header[3:6] == ["val/acc", "val/loss", "test/acc"]
    assert "trainer.epochs" not in lines[0]
    assert lines[2].split()[:4] == [
        "0",
        "0.05",
        "completed",
        f"{read_summary(sweep_dir / '0')['final']['val/acc']:.4g}",
    ]
    assert lines[3].split()[:3] == ["1", "1e+30", read_summary(sweep_dir / "1")["status"]]

    columns, rows = folders.table([sweep_dir])
    with out_csv.open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == columns
        back = list(reader)
    assert back == [{c: "" if r.get(c) is None else str(r[c]) for c in columns} for r in rows]
    assert float(back[0]["test/acc"]) == rows[0]["test/acc"]  # numbers survive the trip exactly

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    by_samples = curves.plot([sweep_dir], "test/acc", x="samples_seen", out=tmp_path / "acc.png")
    assert by_samples.stat().st_size > 10_000


@pytest.mark.slow
def test_compare_several_sweeps_single_runs_and_the_module_entry(
    ok_sweep: tuple[Path, Any], failing_sweep: tuple[Path, Any]
) -> None:
    columns, rows = folders.table([ok_sweep[0], failing_sweep[0]], sort="test/acc")
    assert len(rows) == 4 and "optimizer.lr" in columns
    assert rows[-1]["status"] != "completed"  # no accuracy: sorted last
    accs = [r["test/acc"] for r in rows[:-1]]
    assert accs == sorted(accs, reverse=True)

    columns, rows = folders.table([ok_sweep[0] / "1"])
    assert [r["overrides"] for r in rows] == [
        "trainer.epochs=2 trainer.num_threads=1 optimizer.lr=0.05"
    ]
    assert "overrides" in columns

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mnistlab.compare",
            str(failing_sweep[0]),
            "--sort",
            "wall_s",
            "--asc",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wandb leet" in proc.stdout and "wandb sync" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "mnistlab.compare", str(failing_sweep[0]), "--sort", "nope"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--sort 'nope'" in bad.stderr


def test_disabled_and_none_leave_no_wandb_files(tmp_path: Path) -> None:
    """Four jobs: only logger=wandb with mode auto writes a W&B run."""
    proc = sweep(
        tmp_path / "sweep",
        "trainer.epochs=1",
        "dataset.limit_train=100",  # the default validation part: 10, one of each digit
        "logger=none,wandb",
        "logger.wandb.mode=auto,disabled",
        env=no_credentials_env(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i in range(4):
        job = tmp_path / "sweep" / str(i)
        s = read_summary(job)
        assert s["status"] == "completed"
        logger, mode = s["config"]["logger"]["name"], s["config"]["logger"]["wandb"]["mode"]
        expect_wandb = (logger, mode) == ("wandb", "auto")
        assert (job / "wandb").exists() == expect_wandb, (logger, mode)
    assert not (ROOT / "wandb").exists()


def test_auto_mode_follows_wandb_credentials(tmp_path: Path) -> None:
    """wandb's own credential lookup, in a process whose environment has none to begin with."""
    script = textwrap.dedent(
        f"""
        import os
        from mnistlab.logger.sinks import wandb_mode
        print(wandb_mode("auto"))
        with open({str(tmp_path / "netrc")!r}, "w") as f:
            f.write("machine api.wandb.ai\\n  login user\\n  password " + "a" * 40 + "\\n")
        print(wandb_mode("auto"))
        os.remove({str(tmp_path / "netrc")!r})
        print(wandb_mode("auto"))
        os.environ["WANDB_API_KEY"] = "b" * 40
        print(wandb_mode("auto"), wandb_mode("offline"), wandb_mode("disabled"))
        os.environ["WANDB_MODE"] = "offline"
        print(wandb_mode("auto"))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=no_credentials_env(tmp_path),
        check=True,
        timeout=60,
    ).stdout.split("\n")
    assert out[:5] == ["offline", "online", "offline", "online offline disabled", "offline"]


def test_default_import_does_not_load_wandb() -> None:
    code = "import sys, mnistlab.train, mnistlab.logger.sinks, mnistlab.compare\n"
    code += "print('wandb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_parallel_jobs_from_the_joblib_launcher_config() -> None:
    def hc(launcher: Any, mode: RunMode = RunMode.MULTIRUN) -> Any:
        return OmegaConf.create({"mode": mode, "launcher": OmegaConf.structured(launcher)})

    cores = len(os.sched_getaffinity(0))
    assert parallel_jobs(hc(JobLibLauncherConf(n_jobs=3))) == 3
    assert parallel_jobs(hc(JobLibLauncherConf(n_jobs=-1))) == cores  # joblib: all cores
    assert parallel_jobs(hc(JobLibLauncherConf(n_jobs=-2))) == max(1, cores - 1)
    assert parallel_jobs(hc(JobLibLauncherConf(n_jobs=3), RunMode.RUN)) == 1
    basic = {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}
    assert parallel_jobs(hc(basic)) == 1


def test_overrides_that_differ() -> None:
    rows = [
        {"overrides": "+experiment=bn_momentum trainer.epochs=2 model.bn_momentum=0.1"},
        {"overrides": "+experiment=bn_momentum trainer.epochs=2 model.bn_momentum=null"},
        {"overrides": "trainer.epochs=2 model.bn_momentum=null trainer.seed=1"},
    ]
    assert folders.differing_overrides(rows) == ["experiment", "model.bn_momentum", "trainer.seed"]
    assert folders.parse_overrides(rows[0]["overrides"])["experiment"] == "bn_momentum"


def test_bad_cadence_and_accumulation_are_one_line_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(ConfigError, match=r"logger\.wandb\.log_every_n_steps=0"):
        plan_from_overrides(["logger.wandb.log_every_n_steps=0"])
    assert plan_main(["+experiment=step_accounting", "trainer.grad_accum=2"]) == 0
    assert "Batch size per device                 = 64" in capsys.readouterr().out
    assert plan_main(["+experiment=step_accounting", "trainer.grad_accum=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trainer.grad_accum=3 is not allowed: a divisor of 128" in err


@pytest.mark.slow
def test_wandb_sink_cadence_rank_and_summary(tmp_path: Path) -> None:
    """The real sink, offline: rows on the cadence grid plus every evaluation; rank 1: nothing."""
    overrides = [
        "logger.wandb.mode=offline",
        "logger.wandb.log_every_n_steps=5",
        "trainer.progress=none",
    ]
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    plan = StepPlan(384, 1, 32, 1, 1, False)  # 12 steps
    cadence = Cadence.of(12, wandb=cfg.logger.wandb.log_every_n_steps, has_bn=False)
    assert (
        sinks.build(cfg.logger, tmp_path / "rank1", plan.as_dict(), cadence.wandb_row, rank=1).sinks
        == []
    )
    fan_out = sinks.build(
        cfg.logger, tmp_path, plan.as_dict(), cadence.wandb_row, progress="none", rank=0
    )
    assert [type(s).__name__ for s in fan_out.sinks] == ["ConsoleSink", "JsonlSink", "WandbSink"]
    for step in range(1, 13):
        fan_out.log({"optimizer_step": step, "samples_seen": 32 * step, "train/loss": 1 / step})
        if step == 7:
            row = {"optimizer_step": step, "samples_seen": 32 * step, "test/acc": 0.5}
            fan_out.log(row, kind="eval")
    summary = {"status": "completed", "final": {"test/acc": 0.75}, "counted": {"total_steps": 12}}
    timings = fan_out.finish(summary)
    assert timings["wandb_log_s"] >= 0 and timings["wandb_init_s"] > 0

    run = wandb_run_dir(tmp_path)
    steps = [r["history"]["item"]["optimizer_step"] for r in leet(run) if r["type"] == "history"]
    # 5 and 10 on the grid, 7 the evaluation; 12: the final test/acc differs from the last
    # evaluation's (as after PreciseBN), so it is the last point of the summary's best/final
    assert steps == [5, 7, 10, 12]
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 13  # the local file keeps every row
    state = leet(run, "--summary")
    assert state["summary"]["test/acc"] == {"max": 0.75, "last": 0.75}
    assert state["summary"]["counted/total_steps"] == 12
    assert state["config"]["plan"]["total_steps"] == 12


@pytest.mark.parametrize(
    ("total", "log_every", "rows", "wandb"),
    [
        (118, None, 10, 10),  # one MNIST epoch at batch 512: 11 rows, all sent to W&B
        (900, None, 18, 90),  # the default run: 50 rows, every fifth sent
        (5000, None, 100, 500),
        (900, 7, 7, 84),  # an explicit cadence: W&B still takes every k-th row of it
        (3, None, 10, 10),  # shorter than one cadence: the final step's row only
    ],
)
def test_row_and_wandb_cadence(total: int, log_every: int | None, rows: int, wandb: int) -> None:
    """Rows come about 50 a run, at least 10 steps apart; W&B's grid is a multiple of the row
    cadence, so every step it wants has a row."""
    cadence = Cadence.of(total, rows=log_every)
    assert (cadence.row_every, cadence.wandb_every) == (rows, wandb)
    assert wandb % rows == 0
    assert Cadence.of(total, rows=log_every, wandb=4).wandb_every == 4  # W&B's own key wins
    # every cadence fires at the last step; W&B's grid takes it through the BN point
    assert cadence.row(total) and cadence.bn_point(total) and cadence.wandb_row(total)
    assert not Cadence.of(total, has_bn=False).bn_point(total)
