"""Faults a real user meets, on the real app: two runs into one folder, a damaged or half-written
checkpoint, a full disk, resuming by folder alone, environment errors. Each ends in one clear
line or in a run that carries on correctly; nothing half-written is left behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mnistlab.config import DatasetConfig
from mnistlab.core.errors import ConfigError
from mnistlab.engine import checkpoint, data

from faults import KillAfterSave, override
from support import (
    ROOT,
    app,
    assert_one_line_error,
    read_jsonl,
    read_summary,
    run_app,
    stop_joblib_workers,
    write_mnist_layout,
)

# 200 samples (180 to train, 20 to validate), batch 16, windows of 3: 4 steps an epoch.
TINY = (
    "dataset.limit_train=200",
    "trainer.batch_size=16",
    "trainer.grad_accum=3",
    "trainer.checkpoint_every_n_steps=2",
    "trainer.log_every_n_steps=3",
    "trainer.num_threads=1",
    "trainer.progress=none",
    "logger=none",
)


def popen(run_dir: Path, *overrides: str) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "mnistlab.train", f"hydra.run.dir={run_dir}", *overrides]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_rows(run_dir: Path, proc: subprocess.Popen[str], rows: int) -> None:
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= rows):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended too early"
        time.sleep(0.05)


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.tmp")]


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted TINY run of 3 epochs (in this process), read by several tests."""
    run = tmp_path_factory.mktemp("whole")
    p = app(run, *TINY, "trainer.epochs=3")
    assert p.returncode == 0, p.stderr[-2000:]
    return run


@pytest.mark.slow
def test_a_second_run_into_a_live_runs_folder_is_refused(tmp_path: Path) -> None:
    first = popen(tmp_path, *TINY, "trainer.epochs=5000")
    wait_for_rows(tmp_path, first, 3)
    for second in (  # in this process: the lock is another process's all the same
        app(tmp_path, *TINY, "trainer.epochs=2"),
        app(tmp_path, "trainer.resume=true", "trainer.num_threads=1"),
    ):
        line = assert_one_line_error(second, f"hydra.run.dir={tmp_path}", "in use by a live run")
        assert f"pid {first.pid}" in line
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, err[-2000:]
    read_jsonl(tmp_path / "metrics.jsonl")  # every line parses: one writer only
    s = read_summary(tmp_path)
    assert s["status"] == "interrupted" and s["config"]["trainer"]["epochs"] == 5000
    assert not (tmp_path / ".lock").exists()  # released and removed at the end


@pytest.mark.slow
def test_resume_by_folder_alone_equals_the_uninterrupted_run(whole: Path, tmp_path: Path) -> None:
    """``hydra.run.dir=<folder> trainer.resume=true`` and nothing else: the folder's own
    config (a subset, accumulation, a cadence) continues, bit for bit on CPU. The killed
    run's lock file and a save it left half-written are taken over."""
    cut = tmp_path / "cut"
    killed = run_app(cut, *TINY, "trainer.epochs=3", *override("k", KillAfterSave, nth=4))
    assert killed.returncode == -signal.SIGKILL
    assert (cut / ".lock").exists()  # the kernel released the lock, the file stays
    stale = cut / "checkpoints" / ".last.pt.abc123.tmp"  # a save killed mid-way
    stale.write_bytes(b"half a checkpoint")
    p = app(cut, "trainer.resume=true")
    assert p.returncode == 0, p.stderr[-2000:]
    assert read_summary(cut)["status"] == "completed" and not leftovers(cut)
    assert not (cut / ".lock").exists()
    assert read_jsonl(cut / "metrics.jsonl") == read_jsonl(whole / "metrics.jsonl")
    assert read_summary(cut)["final"] == read_summary(whole)["final"]
    # a key given on the command line must agree, unless it may change
    again = app(cut, "trainer.resume=true", "trainer.batch_size=32", "trainer.epochs=4")
    assert_one_line_error(again, "trainer.batch_size (16 -> 32)", "leave the rest out")


@pytest.mark.slow
def test_sigterms_resume_command_works_verbatim(tmp_path: Path) -> None:
    proc = popen(tmp_path, *TINY, "trainer.epochs=40")
    wait_for_rows(tmp_path, proc, 4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    command = re.search(r"continue with: (python -m mnistlab\.train .*)$", err, re.M)
    assert command is not None, err[-2000:]
    p = app_command(command.group(1))
    assert p.returncode == 0, p.stderr[-2000:]
    s = read_summary(tmp_path)
    assert s["status"] == "completed" and s["accounting_matches_plan"]
    assert s["counted"]["epochs"] == 40 and s["plan"]["num_samples"] == 180  # 200 less val


@pytest.mark.slow
def test_after_a_divergence_the_learning_rate_may_change_on_resume(tmp_path: Path) -> None:
    # checkpoints at step 0 and epoch ends only: the one kept is from before the blow-up
    p = app(tmp_path, *TINY, "trainer.epochs=2", "optimizer.lr=1e10",
            "trainer.checkpoint_every_n_steps=null")  # fmt: skip
    line = assert_one_line_error_code(p, 1, "try a lower optimizer.lr")
    advice = re.search(r"with: python -m mnistlab\.train (.*)$", line)
    assert advice is not None and "optimizer.lr=1e+09" in advice.group(1)
    resumed = app(tmp_path, "trainer.resume=true", "optimizer.lr=0.05")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    s = read_summary(tmp_path)
    assert s["status"] == "completed" and s["config"]["optimizer"]["lr"] == 0.05


def app_command(command: str) -> subprocess.CompletedProcess[str]:
    """A printed ``python -m mnistlab.train ARGS`` command run as written, in this process."""
    words = command.split()
    assert words[:3] == ["python", "-m", "mnistlab.train"], command
    (where,) = [w for w in words[3:] if w.startswith("hydra.run.dir=")]
    rest = [w for w in words[3:] if w != where]
    return app(Path(where.split("=", 1)[1]), *rest)


def assert_one_line_error_code(
    p: subprocess.CompletedProcess[str], code: int, *needles: str
) -> str:
    out = p.stdout + p.stderr
    assert p.returncode == code and "Traceback" not in out, out[-3000:]
    lines = [ln for ln in out.splitlines() if "error:" in ln]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), out[-3000:]
    return lines[0]


@pytest.mark.slow
def test_a_damaged_checkpoint_is_refused_and_the_folder_kept(whole: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    last = run / checkpoint.LAST
    state = torch.load(last, weights_only=True)
    assert state["digest"] == checkpoint.digest(state)
    blob = bytearray(last.read_bytes())
    weights = state["model"]["1.weight"].numpy().tobytes()
    at = bytes(blob).find(weights[:64])  # a byte inside the stored weights: it still loads
    assert at > 0
    blob[at + 10] ^= 0x01
    last.write_bytes(bytes(blob))
    before = {p: p.read_bytes() for p in (run / "summary.json", run / "metrics.jsonl")}
    p = app(run, "trainer.resume=true", "trainer.epochs=4")
    assert_one_line_error(p, str(last), "damaged", "not loaded")
    assert {q: q.read_bytes() for q in before} == before


@pytest.mark.slow
def test_files_of_a_run_share_one_mode(whole: Path) -> None:
    modes = {p.name: p.stat().st_mode & 0o777 for p in (whole / "metrics.jsonl",
             whole / "summary.json", whole / checkpoint.LAST)}  # fmt: skip
    assert len(set(modes.values())) == 1 and modes["summary.json"] != 0o600, modes


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_one(tmp_path: Path) -> None:
    """A small tmpfs: the step-0 checkpoint fits, the next one does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)],
                             capture_output=True, check=False)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root: " + mounted.stderr.decode()[-200:])
    try:
        run = disk / "run"
        p = app(run, *TINY, "trainer.epochs=3")
        line = assert_one_line_error(p, "No space left on device", "free some space")
        assert "last.pt" in line
        state = torch.load(run / checkpoint.LAST, weights_only=True)  # the earlier one, whole
        assert state["digest"] == checkpoint.digest(state)
        assert not leftovers(run)
    finally:
        # lazily: this process's logging may still hold the run's train.log open
        subprocess.run(["umount", "--lazy", str(disk)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("run_dir", "needles"),
    [
        ("/etc/hostname/run", ["/etc/hostname/run", "not a folder"]),
        ("/tmp/" + "x" * 300, ["File name too long", "shorter path"]),
    ],
    ids=["under a file", "name too long"],
)
def test_an_output_folder_that_cannot_be_made_is_one_line(run_dir: str, needles: list[str]) -> None:
    if not Path("/etc/hostname").is_file() and "hostname" in run_dir:
        pytest.skip("no /etc/hostname here")
    assert_one_line_error(app(Path(run_dir), *TINY), *needles)


@pytest.mark.slow
def test_wandb_online_without_credentials_is_one_line(tmp_path: Path) -> None:
    # a process of its own: W&B reads its settings (and where credentials are) once a process
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    p = run_app(tmp_path / "run", "trainer.epochs=1", "logger.wandb.mode=online", env=env)
    assert_one_line_error(p, "logger.wandb.mode='online'", "wandb login")
    assert not (tmp_path / "run" / "wandb").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_accelerator_cuda_without_a_gpu_names_the_accelerator() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    from hydra import compose, initialize_config_dir

    from mnistlab.config import CONF_DIR, register
    from mnistlab.processes import distributed

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["trainer.accelerator=cuda"])
    with pytest.raises(ConfigError) as e:
        distributed.plan_launch(cfg)
    assert e.value.key == "trainer.accelerator" and "no CUDA device" in str(e.value)


def _idx(root: Path, how: str) -> Path:
    """A small MNIST layout whose content (not format) is wrong the way ``how`` says."""
    raw = write_mnist_layout(root, "MNIST", n_train=60, n_test=20)
    if how == "labels out of range":
        path = raw / "train-labels-idx1-ubyte"
        blob = bytearray(path.read_bytes())
        blob[8 + 5] = 12  # the sixth label: 12, in a 10-class dataset
        path.write_bytes(bytes(blob))
    elif how == "sizes differ":
        write_mnist_layout(root / "small", "MNIST", n_train=60, n_test=20, size=20)
        for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            (raw / name).write_bytes((root / "small" / "MNIST" / "raw" / name).read_bytes())
    elif how == "empty":  # valid headers, no samples
        (raw / "train-images-idx3-ubyte").write_bytes(bytes.fromhex("00000803") + bytes(12)[:4]
                                                      + (28).to_bytes(4, "big") * 2)  # fmt: skip
        (raw / "train-labels-idx1-ubyte").write_bytes(bytes.fromhex("00000801") + bytes(4))
    return root


@pytest.mark.parametrize(
    ("how", "needles"),
    [
        ("labels out of range", ["train split has labels 0..12", "0..9"]),
        ("sizes differ", ["train and test images differ in size (28x28 vs 20x20)"]),
        ("empty", ["train-images-idx3-ubyte", "holds no samples (its header counts 0)"]),
    ],
)
def test_idx_content_errors_name_the_split(tmp_path: Path, how: str, needles: list[str]) -> None:
    root = _idx(tmp_path, how)
    with pytest.raises(data.DataError) as e:
        data.load(DatasetConfig("mnist", str(root), download=False))
    assert all(n in str(e.value) for n in needles) and "\n" not in str(e.value), str(e.value)


SWEEP = (*TINY[:-1], "logger=none", "trainer.checkpoint_every_n_steps=null")


def sweep(sweep_dir: Path, *overrides: str) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "mnistlab.train", "-m", f"hydra.sweep.dir={sweep_dir}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([*args, *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def statuses(sweep_dir: Path) -> dict[str, str]:
    import csv

    with open(sweep_dir / "sweep_summary.csv") as f:
        return {Path(r["run"]).name: r["status"] for r in csv.DictReader(f)}


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line names ``text`` (the sweep's folder)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    ("launcher", "jobs", "running"),
    [
        ((), ["trainer.epochs=2,150,2"], ["1"]),  # job 0 done, 1 running, 2 not started
        (
            ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2"),
            ["trainer.epochs=150", "trainer.seed=0,1,2"],
            ["0", "1"],  # two running at once, the third not started
        ),
        (  # one stacked group: every job stops at the same step
            ("hydra/launcher=stacked",),
            ["trainer.epochs=150", "trainer.seed=0,1,2"],
            ["0", "1", "2"],
        ),
    ],
    ids=["basic", "joblib", "stacked"],
)
def test_a_stopped_sweep_checkpoints_its_jobs_and_resumes_as_a_whole(
    tmp_path: Path, launcher: tuple[str, ...], jobs: list[str], running: list[str]
) -> None:
    overrides = (*SWEEP, *launcher, *jobs)
    proc = sweep(tmp_path, *overrides)
    for job in running:
        wait_for_rows(tmp_path / job, proc, 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "sweep interrupted by SIGTERM" in err and "trainer.resume=true" in err
    assert not processes_mentioning(str(tmp_path)), "a job process outlived its sweep"
    stopped = statuses(tmp_path)
    assert all(stopped[j] == "interrupted" for j in running)
    assert set(stopped.values()) <= {"interrupted", "completed"}, stopped
    if not launcher:  # one job after another: the third never started
        assert stopped == {"0": "completed", "1": "interrupted"}
    done = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/summary.json")
            if stopped.get(p.parent.name) == "completed"}  # fmt: skip
    for job in running:
        assert (tmp_path / job / checkpoint.LAST).is_file()

    try:  # the same sweep again, in this process (a joblib sweep's jobs: in its workers)
        again = app(tmp_path, *overrides, "trainer.resume=true", multirun=True)
    finally:
        stop_joblib_workers()
    assert again.returncode == 0, again.stderr[-3000:]
    assert set(statuses(tmp_path).values()) == {"completed"} and len(statuses(tmp_path)) == 3
    for job in running:
        assert "resuming from" in (tmp_path / job / "train.log").read_text()
    for path, mtime in done.items():  # a job that had completed was not run again
        assert path.stat().st_mtime_ns == mtime
