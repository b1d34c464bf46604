"""What a W&B run holds: its name and group from its overrides, best and final accuracy, the
BN and plan tables, the gap chart, the report's pictures, Hydra's files and the checkpoint, and
a quiet console by default. Real W&B offline, read back with W&B's own reader
(``wandb leet inspect``)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mnistlab.config import CONF_DIR, register
from mnistlab.logger import wandb_run
from mnistlab.results import folders

from support import leet, no_credentials_env, read_jsonl, read_summary, run_app, wandb_run_dir


def loud_env(tmp: Path) -> dict[str, str]:
    """No credentials, and no ``WANDB_SILENT`` (the suite's default): whether W&B prints is
    then up to ``logger.wandb.quiet`` alone.

    The runs that read W&B's console output are processes of their own: W&B settles whether
    it may print once a process (a run in this process after a silent one prints nothing)."""
    env = no_credentials_env(tmp)
    env.pop("WANDB_SILENT")
    return env


def png(width: int, height: int) -> bytes:
    """A real grey PNG, written by hand: signature, IHDR, one IDAT, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\x00" + bytes([128] * width) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))  # fmt: skip


def table_of(run: Path, summary: dict[str, Any], key: str) -> dict[str, Any]:
    """A table W&B keeps in the run's files, found through the summary entry that names it."""
    entry = summary[key]
    assert entry["_type"] == "table-file", entry
    return json.loads((run / "files" / entry["path"]).read_text())


def test_swept_keys_from_the_composed_sweep_config() -> None:
    """The sweep config as Hydra composes it (what multirun.yaml holds): a preset's
    ``hydra.sweeper.params`` and the command line's sweep arguments, never plain values."""
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=bn_momentum"],
                      return_hydra_config=True)  # fmt: skip
    task = ["+experiment=bn_momentum", "trainer.epochs=1", "trainer.seed=0,1", "x=range(2)"]
    OmegaConf.update(cfg, "hydra.overrides.task", task)
    assert wandb_run.swept_keys(cfg) == ["model.bn_momentum", "trainer.seed", "x"]
    OmegaConf.update(cfg, "hydra.sweeper.params", None)
    assert wandb_run.swept_keys(cfg) == ["trainer.seed", "x"]


def test_names_and_groups_from_overrides(tmp_path: Path) -> None:
    job = ["+experiment=bn_momentum", "trainer.epochs=1", "model.bn_momentum=0.1", "trainer.seed=1"]
    name = wandb_run.label(wandb_run.chosen(job, keep=["model.bn_momentum", "trainer.seed"]))
    assert name == "model.bn_momentum=0.1,trainer.seed=1"
    assert wandb_run.label(wandb_run.chosen(job, keep=[])) == ""
    # the group: less the seed and what changes nothing trained (a key or anything below it)
    loud = [*job, "trainer.progress=bar", "logger.wandb.quiet=false", "logger=wandb", "report=true"]
    grouped = wandb_run.chosen(loud, drop=wandb_run.NOT_TRAINED)
    assert grouped == ["experiment=bn_momentum", "trainer.epochs=1", "model.bn_momentum=0.1"]
    many = [f"optimizer.lr={i / 7}" for i in range(6)]
    name = wandb_run.label(many)
    assert len(name) <= wandb_run.LABEL_CHARS < len(",".join(many))
    assert name.startswith(many[0]) and name.endswith(" more") and "#" not in name
    kept = name.count("optimizer.lr=")
    assert name.endswith(f" +{6 - kept} more") and 1 <= kept < 6

    started = time.mktime((2026, 11, 30, 12, 0, 5, 0, 0, -1))
    sweep = tmp_path / "outputs" / "multirun" / "2026-11-30" / "12-00-00"
    assert wandb_run.group_name(["optimizer.lr", "trainer.seed"], started, sweep) == (
        "optimizer.lr×trainer.seed 2026-11-30 12:00:05"
    )
    assert wandb_run.group_name([], started, sweep) == "2026-11-30/12-00-00"


def test_per_layer_keys_get_their_own_section_and_the_chart_its_points() -> None:
    rows = [
        {"optimizer_step": s, "bn/gap_mean": 1.0 / s, "bn/2/mean_gap_mean": 2.0 / s,
         "bn/2/pred_mean_gap_mean": 1.5 / s, "bn/2/gap_vs_pred": 4.0 / 3}
        for s in (2, 4)
    ]  # fmt: skip
    sent = wandb_run.for_wandb(rows[0])  # layer "2" of a family's model: section "net.2"
    moved = {f"net.2/{k}" for k in ("mean_gap_mean", "pred_mean_gap_mean", "gap_vs_pred")}
    assert set(sent) == {"optimizer_step", "bn/gap_mean", *moved}
    assert sent["net.2/mean_gap_mean"] == rows[0]["bn/2/mean_gap_mean"]
    gaps = wandb_run.GapHistory()
    for row in [*rows, {"optimizer_step": 5, "test/acc": 0.9}]:
        gaps.add(row)
    xs, ys, keys = gaps.series()
    assert keys == ["net.2 measured", "net.2 predicted"]
    assert xs == [[2, 4], [2, 4]] and ys == [[1.0, 0.5], [0.75, 0.375]]


@pytest.mark.slow
def test_a_default_quiet_run_holds_tables_chart_pictures_files_and_checkpoint(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    picture = png(12, 8)
    (run / "report" / "gaps.png").write_bytes(picture)
    overrides = ("trainer.epochs=2", "trainer.num_threads=1", "trainer.progress=bar",
                 "bn_stats.recalibrate=true", "logger.wandb.log_checkpoint=true")  # fmt: skip
    p = run_app(run, *overrides, env=loud_env(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert not [ln for ln in out.splitlines() if "wandb:" in ln]  # quiet by default
    assert "wandb sync" in out  # mnistlab's own one-line hint for the offline run
    s = read_summary(run)
    total = s["plan"]["total_steps"]
    bar = p.stderr[p.stderr.index("| 0/") : p.stderr.index(f"| {total}/{total}")]
    assert "wandb" not in bar.lower()  # nothing cut into the progress bar

    w = wandb_run_dir(run)
    records = leet(w)
    (info,) = [r["run"] for r in records if r["type"] == "run"]
    assert info["display_name"] == ",".join(overrides) == ",".join(s["overrides"])
    # its group: the overrides less those that change nothing trained (progress, threads, logger)
    assert info["run_group"] == "trainer.epochs=2,bn_stats.recalibrate=true"
    state = leet(w, "--summary")
    summary = state["summary"]
    evals = [r["test/acc"] for r in read_jsonl(run / "metrics.jsonl") if "test/acc" in r]
    final = s["final"]["test/acc"]  # after PreciseBN: the last point W&B got
    assert final != evals[-1]
    assert summary["test/acc"] == pytest.approx({"max": max(*evals, final), "last": final})
    assert summary["test/loss"]["last"] == pytest.approx(s["final"]["test/loss"])
    assert summary["bn/gap_mean"] == pytest.approx(s["final"]["bn/gap_mean"])
    assert not [k for k in summary if re.match(r"bn/[^/]+/", k)]  # per-layer keys moved

    gaps = table_of(w, summary, "bn_layers/final_gaps")
    assert [row[0] for row in gaps["data"]] == list(s["bn"])
    col = gaps["columns"].index("mean_gap_mean")
    assert [row[col] for row in gaps["data"]] == [v["mean_gap_mean"] for v in s["bn"].values()]
    plan = table_of(w, summary, "accounting/plan")
    planned, counted = (dict(zip(plan["columns"], row, strict=True)) for row in plan["data"])
    assert planned["total_steps"] == counted["total_steps"] == total
    assert planned["total_micro_batches"] == s["plan"]["total_micro_batches"]

    chart = table_of(w, summary, "bn_layers/mean_gap_vs_theory_table")
    layer = next(iter(s["bn"]))
    key = f"bn/{layer}/mean_gap_mean"
    points = [(r["optimizer_step"], r[key]) for r in read_jsonl(run / "metrics.jsonl") if key in r]
    measured = f"net.{layer} measured"  # the line of the family's layer "2" is "net.2 ..."
    assert [(x, y) for x, k, y in chart["data"] if k == measured] == points
    assert {k for _, k, _ in chart["data"]} == {
        f"net.{n} {what}" for n in s["bn"] for what in ("measured", "predicted")
    }
    image = summary["report/gaps"]
    assert (image["_type"], image["width"], image["height"]) == ("image-file", 12, 8)
    assert (w / "files" / image["path"]).read_bytes() == picture

    saved = {f["path"] for r in records if r["type"] == "files" for f in r["files"]["files"]}
    assert {"hydra/config.yaml", "hydra/hydra.yaml", "hydra/overrides.yaml", "train.log"} <= saved
    assert (w / "files" / "hydra" / "config.yaml").read_text() == (
        run / ".hydra" / "config.yaml"
    ).read_text()
    (model,) = [r["artifact"] for r in records
                if r["type"] == "artifact" and r["artifact"]["type"] == "model"]  # fmt: skip
    assert "last" in model["aliases"] and model["name"] == f"checkpoint-{info['run_id']}"
    (entry,) = model["manifest"]["contents"]
    md5 = base64.b64encode(hashlib.md5((run / "checkpoints" / "last.pt").read_bytes()).digest())
    assert (entry["path"], entry["digest"]) == ("last.pt", md5.decode())


@pytest.mark.slow
def test_sweep_names_differ_only_in_the_swept_key_and_share_one_group(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    p = run_app(sweep, "trainer.epochs=1", "trainer.num_threads=1", "trainer.seed=0,1",
                "logger.wandb.quiet=false", env=loud_env(tmp_path), multirun=True,
                timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("wandb:")]  # loud
    infos = []
    for job in ("0", "1"):
        (info,) = [r["run"] for r in leet(wandb_run_dir(sweep / job)) if r["type"] == "run"]
        infos.append(info)
    assert [i["display_name"] for i in infos] == ["trainer.seed=0", "trainer.seed=1"]
    # one configuration, seeds grouped: its overrides less the seed, the threads and the logger
    assert [i["run_group"] for i in infos] == ["trainer.epochs=1"] * 2

    # the same two runs locally: one configuration, two seeds
    (row,) = folders.table([sweep])[1]
    accs = [read_summary(sweep / job)["final"]["test/acc"] for job in ("0", "1")]
    assert row["test/acc"].n == 2 and row["test/acc"].mean == pytest.approx(sum(accs) / 2)
    assert row["trainer.seed"] == "0,1"
