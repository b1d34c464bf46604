"""The loggers a user steers: W&B's name, group, tags, notes and job type from the command line
(interpolations too), defaults that read well (swept values, seeds grouped, per-layer sections
by module path), one W&B run across a resume, one sync line; TensorBoard beside it.

Real runs of the app in this process, W&B offline read back with W&B's own reader
(``wandb leet inspect``), TensorBoard's event files with TensorBoard's own
``EventAccumulator``. One run (resumed once) and one sweep serve every assert.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnistlab.config import CONF_DIR, register
from mnistlab.logger import wandb_run

from support import app, assert_one_line_error, leet, read_jsonl, read_summary

FAST = ("trainer.epochs=1", "trainer.num_threads=1", "trainer.progress=none",
        "dataset.limit_train=400")  # fmt: skip
STEERED = ("logger=wandb_tensorboard", "report=true", "logger.wandb.group=mine-${optimizer.lr}",
           "logger.wandb.notes=first try", "logger.wandb.job_type=probe",
           "logger.wandb.tags=[a,b]")  # fmt: skip


def ok(p: Any) -> str:
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p.stdout + p.stderr


def run_record(folder: Path) -> dict[str, Any]:
    (info,) = [r["run"] for r in leet(folder) if r["type"] == "run"]
    return info


def events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """One steered run of one epoch, then resumed for a second: its folder and both outputs."""
    run = tmp_path_factory.mktemp("steered") / "run"
    first = ok(app(run, *FAST, *STEERED))
    second = ok(app(run, "trainer.resume=true", "trainer.epochs=2"))
    return run, first, second


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Two learning rates by two seeds, with the default logger (W&B)."""
    folder = tmp_path_factory.mktemp("sweep") / "sweep"
    out = ok(app(folder, *FAST, "optimizer.lr=0.02,0.05", "trainer.seed=0,1", multirun=True))
    return folder, out


def test_wandb_takes_the_command_lines_labels_and_keeps_them_across_a_resume(
    resumed: tuple[Path, str, str],
) -> None:
    run, first, second = resumed
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2  # a resume writes a second folder ...
    infos = [run_record(f) for f in folders]
    assert len({i["run_id"] for i in infos}) == 1  # ... of the same W&B run
    for info in infos:
        assert info["run_group"] == "mine-0.05"  # the interpolation, resolved
        assert info["job_type"] == "probe" and info["notes"] == "first try"
        assert info["tags"] == ["a", "b"]
        assert info["display_name"] == infos[0]["display_name"]
    assert infos[0]["display_name"].startswith("trainer.epochs=1,trainer.num_threads=1")
    # one short sync line, whose pattern names both folders of the run and nothing else
    (hint,) = [ln for ln in second.splitlines() if "wandb sync" in ln]
    pattern = hint.split("wandb sync ", 1)[1].strip()
    assert sorted(Path("/").glob(pattern.lstrip("/"))) == folders
    assert not [ln for ln in first.splitlines() if ln.startswith("wandb:")]  # W&B kept quiet


def test_per_layer_keys_read_as_module_paths_in_wandb(resumed: tuple[Path, str, str]) -> None:
    run = resumed[0]
    layers = list(read_summary(run)["bn"])  # the model's names: "2", "5"
    summary = leet(sorted((run / "wandb").glob("offline-run-*"))[-1], "--summary")["summary"]
    for layer in layers:
        assert f"net.{layer}/mean_gap_mean" in summary
    assert not [k for k in summary if k.startswith(("bn_layers/2", "bn/2/"))]


def test_tensorboard_holds_every_row_the_config_and_the_pictures(
    resumed: tuple[Path, str, str],
) -> None:
    run = resumed[0]
    acc = events(run / "tensorboard")
    rows = read_jsonl(run / "metrics.jsonl")  # both attempts: epochs 1 and 2
    for key in ("train/loss", "val/acc", "lr"):
        want = [(r["optimizer_step"], r[key]) for r in rows if r.get(key) is not None]
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in want], key  # resumed: no step twice
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), key
    s = read_summary(run)
    layer = next(iter(s["bn"]))
    assert f"net.{layer}/mean_gap_mean" in acc.Tags()["scalars"]
    assert acc.Scalars("final/test/acc")[-1].value == pytest.approx(s["final"]["test/acc"])
    for png in sorted((run / "report").glob("*.png")):
        (image,) = acc.Images(f"report/{png.stem}")[-1:]
        assert image.encoded_image_string == png.read_bytes()
    (text,) = acc.Tensors("config/text_summary")
    assert b"lr: 0.05" in text.tensor_proto.string_val[0]
    assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")


def test_sweep_names_by_swept_values_and_groups_seeds(sweep: tuple[Path, str]) -> None:
    folder, out = sweep
    infos = [run_record(next((folder / str(j) / "wandb").glob("offline-run-*"))) for j in range(4)]
    names = [i["display_name"] for i in infos]
    assert names == [f"optimizer.lr={lr},trainer.seed={seed}"
                     for lr in ("0.02", "0.05") for seed in (0, 1)]  # fmt: skip
    groups = [i["run_group"] for i in infos]
    assert groups[0] == groups[1] != groups[2] == groups[3]  # one group per configuration
    assert "trainer.seed" not in groups[0] and "optimizer.lr=0.02" in groups[0]
    # the sweep's pictures, once, in a run of their own; one short sync line for all five runs
    (report,) = (folder / "wandb").glob("offline-run-*")
    assert run_record(report)["job_type"] == "report"
    assert "report/accuracy" in leet(report, "--summary")["summary"]
    hints = [ln for ln in out.splitlines() if "wandb sync" in ln]
    assert len(hints) == 1
    assert hints[0].endswith(
        f"wandb sync {folder}/*/wandb/offline-run-* {folder}/wandb/offline-run-*"
    )


def test_optuna_trials_are_named_by_their_sampled_values() -> None:
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hparams_search=digits_optuna"],
                      return_hydra_config=True)  # fmt: skip
    keys = wandb_run.swept_keys(cfg)  # Optuna writes no multirun.yaml: the job's own
    assert keys == ["optimizer.lr", "trainer.batch_size", "model.bn_momentum"]
    task = ["hparams_search=digits_optuna", "trainer.epochs=1", "optimizer.lr=0.04971664940524736",
            "trainer.batch_size=16", "model.bn_momentum=0.12512806369135343"]  # fmt: skip
    name = wandb_run.label(wandb_run.chosen(task, keep=keys))
    assert name == "optimizer.lr=0.04972,trainer.batch_size=16,model.bn_momentum=0.1251"
    OmegaConf.update(cfg, "hydra.sweeper.params", None)
    assert wandb_run.swept_keys(cfg) == []


def test_long_labels_stay_within_wandbs_limit_and_distinct() -> None:
    many = [f"model.hidden=[{i},{i}]" for i in range(20)]
    a, b = wandb_run.label(many, digits=8), wandb_run.label([*many[:-1], "x=1"], digits=8)
    assert len(a) <= wandb_run.LABEL_CHARS and len(b) <= wandb_run.LABEL_CHARS
    assert a != b and a.startswith(many[0]) and " more #" in a


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("logger.wandb.job_type=" + "j" * 65, ["logger.wandb.job_type", "1-64 characters"]),
        ("logger.wandb.tags=[" + "t" * 65 + "]", ["logger.wandb.tags[0]", "1-64 characters"]),
        ("logger=tensorbord", ["logger", "tensorboard"]),
    ],
)
def test_a_bad_label_is_one_line(tmp_path: Path, override: str, needles: list[str]) -> None:
    assert_one_line_error(app(tmp_path / "run", *FAST, override), *needles)


def test_layer_sections_are_module_paths() -> None:
    from mnistlab.logger.keys import shown_key

    assert shown_key("bn/2/mean_gap_mean") == "net.2/mean_gap_mean"  # a family's nn.Sequential
    assert shown_key("bn/features.1/gap_vs_pred") == "features.1/gap_vs_pred"  # your own module
    assert shown_key("bn/gap_mean") == "bn/gap_mean" and shown_key("val/acc") == "val/acc"


def test_progress_bar_and_wandb_summary_lead_with_validation() -> None:
    """The bar keeps each key's last value (an evaluation row's stay while steps go on),
    validation first; W&B defines validation's best and last before test's."""
    from mnistlab.logger.sinks import ConsoleSink

    sink = ConsoleSink(total_steps=10, mode="bar")
    try:
        sink.log({"optimizer_step": 5, "epoch": 0.5, "train/loss": 0.75}, "step")
        sink.log({"optimizer_step": 5, "epoch": 0.5, "test/acc": 0.9, "val/acc": 0.8,
                  "val/loss": 0.5, "train_slice/acc": 1.0}, "eval")  # fmt: skip
        sink.log({"optimizer_step": 6, "epoch": 0.6, "train/loss": 0.25}, "step")
        assert sink.bar is not None
        assert (
            sink.bar.postfix
            == "val/loss=0.5, val/acc=0.8, test/acc=0.9, train/loss=0.25, epoch=0.6"
        )
    finally:
        sink.finish({})
    assert list(wandb_run.SUMMARIES)[:2] == ["val/acc", "val/loss"]
