"""What a W&B run holds beyond its rows: its name and group, its summaries, and the tables,
chart, pictures and files it receives once, when the job finishes.

A job of a sweep cannot see the other jobs, but Hydra writes the sweep's config to
``<sweep dir>/multirun.yaml`` before the first job starts: the swept keys come from there
(the sweep arguments in ``hydra.overrides.task`` and the presets' ``hydra.sweeper.params``),
parsed by Hydra's own override parser. The name is the job's values of those keys only; the
full override list stays in the run's config.

wandb and Hydra are imported inside the functions that need them (see :mod:`mnistlab.logger.sinks`).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnistlab.core.files import flatten

log = logging.getLogger("mnistlab")

# W&B keeps best and final of these in the run summary (``test/acc.max``, ``test/acc.last``)
SUMMARIES = {
    "test/acc": "max,last",
    "test/loss": "min,last",
    "val/acc": "max,last",
    "val/loss": "min,last",
}
NAME_CHARS = 60  # a run name longer than this keeps its first overrides and says how many more
LAYERS = "bn_layers"  # W&B's section for per-layer BN keys: ``bn/<layer>/x`` -> ``bn_layers/...``


@dataclass(frozen=True)
class Identity:
    """How a run is found in W&B: its group (the sweep), its name, its command-line overrides."""

    group: str
    name: str
    overrides: tuple[str, ...] = ()


def identity(out_dir: Path) -> Identity:
    """This Hydra job's group and name (see the module's docstring). Outside Hydra (a DDP
    worker started by hand) the run folder names both."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    out_dir = Path(out_dir).resolve()
    if not HydraConfig.initialized():
        return Identity(folder_label(out_dir), out_dir.name)
    hc = HydraConfig.get()
    overrides = tuple(hc.overrides.task)
    if hc.mode != RunMode.MULTIRUN:
        return Identity(folder_label(out_dir), short_name(overrides) or out_dir.name, overrides)
    sweep_dir = Path(hc.sweep.dir).resolve()
    keys, started = sweep_of(sweep_dir / "multirun.yaml")
    name = short_name(overrides, keys) or short_name(overrides) or out_dir.name
    return Identity(group_name(keys, started, sweep_dir), name, overrides)


def sweep_of(multirun_yaml: Path) -> tuple[list[str], float | None]:
    """The swept keys of the sweep whose config Hydra saved at ``multirun_yaml``, and when it
    was saved (the sweep's start); no keys and no time if the file is not there."""
    from omegaconf import OmegaConf

    if not multirun_yaml.is_file():
        return [], None
    return swept_keys(OmegaConf.load(multirun_yaml)), multirun_yaml.stat().st_mtime


def swept_keys(sweep_cfg: Any) -> list[str]:
    """The keys a sweep varies: its sweep arguments (``optimizer.lr=0.1,0.2``) and the sweeps
    in ``hydra.sweeper.params`` (where presets such as ``+experiment=bn_momentum`` put theirs),
    as Hydra's override parser reads them. Presets' params first, as the sweeper orders them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    hydra = sweep_cfg.hydra
    params = hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=False) if params else {}
    lines = [f"{k}={v}" for k, v in params.items() if v is not None]
    lines += list(hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(lines)
    return list(dict.fromkeys(o.key_or_group for o in parsed if o.is_sweep_override()))


def short_name(overrides: Sequence[str], keys: Iterable[str] | None = None) -> str:
    """The overrides whose key is in ``keys`` (all when None), space-separated; past
    :data:`NAME_CHARS`, the first ones and ``+N more``."""
    chosen = list(overrides)
    if keys is not None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        wanted = set(keys)
        parsed = OverridesParser.create().parse_overrides(chosen)
        chosen = [o for o, p in zip(chosen, parsed, strict=True) if p.key_or_group in wanted]
    shown: list[str] = []
    for item in chosen:
        if shown and len(" ".join([*shown, item])) > NAME_CHARS:
            break
        shown.append(item)
    rest = len(chosen) - len(shown)
    return " ".join(shown) + (f" +{rest} more" if rest else "")


def group_name(keys: Sequence[str], started: float | None, sweep_dir: Path) -> str:
    """``optimizer.lr×trainer.seed 2026-11-30 12:00:00``: what the sweep varies and when it
    started; the sweep's folder when that is unknown."""
    if not keys or started is None:
        return folder_label(sweep_dir)
    return f"{'×'.join(keys)} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}"


def folder_label(folder: Path) -> str:
    """A run or sweep folder as its path below ``multirun/`` or ``runs/``
    (``2026-01-31/12-00-00``), so two days' runs never share a label."""
    parts = folder.parts
    for anchor in ("multirun", "runs"):
        if anchor in parts[:-1]:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[i + 1 :])
    return folder.name


# --- rows ---------------------------------------------------------------------------------------


def layer_key(key: str) -> tuple[str, str] | None:
    """``bn/<layer>/<metric>`` -> ``(layer, metric)``; None for any other key."""
    if not key.startswith("bn/") or key.count("/") < 2:
        return None
    layer, _, metric = key[3:].rpartition("/")
    return layer, metric


def for_wandb(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row as W&B gets it: per-layer BN keys in their own section (``bn_layers/...``), so
    the ``bn`` section keeps the aggregates. ``metrics.jsonl`` keeps the original keys."""
    return {(f"{LAYERS}/{k[3:]}" if layer_key(k) else k): v for k, v in row.items()}


GAP_SERIES = {"mean_gap_mean": "measured", "pred_mean_gap_mean": "predicted"}


class GapHistory:
    """The measured and the predicted running-mean gap of each BN layer at every BN point the
    sink saw (all of them, not only those sent to W&B): the finish-time chart's data."""

    def __init__(self) -> None:
        self.points: dict[str, dict[str, list[tuple[float, float]]]] = {}

    def add(self, row: Mapping[str, Any]) -> None:
        step = row.get("optimizer_step")
        for key, value in row.items():
            parts = layer_key(key)
            if parts is None or step is None or not isinstance(value, (int, float)):
                continue
            if parts[1] in GAP_SERIES:
                layer = self.points.setdefault(parts[0], {"measured": [], "predicted": []})
                layer[GAP_SERIES[parts[1]]].append((step, float(value)))

    def series(self) -> tuple[list[list[float]], list[list[float]], list[str]]:
        """``(xs, ys, keys)`` for ``wandb.plot.line_series``: per layer, measured then
        predicted, each against its own optimizer steps."""
        xs, ys, keys = [], [], []
        for layer, lines in self.points.items():
            for what in ("measured", "predicted"):
                if lines[what]:
                    x, y = zip(*lines[what], strict=True)
                    xs.append(list(x))
                    ys.append(list(y))
                    keys.append(f"{layer} {what}")
        return xs, ys, keys


# --- at finish ----------------------------------------------------------------------------------


def finish_media(summary: Mapping[str, Any], gaps: GapHistory, out_dir: Path) -> dict[str, Any]:
    """What the run gets once, in one ``run.log``: the per-layer BN gaps and the step plan as
    tables, measured vs predicted gap as one chart, and the report's pictures, if any."""
    import wandb

    media: dict[str, Any] = {}
    if summary.get("bn"):
        rows = {layer: flatten(v, "/") for layer, v in summary["bn"].items()}
        columns = list(dict.fromkeys(k for r in rows.values() for k in r))
        data = [[layer, *(r.get(c) for c in columns)] for layer, r in rows.items()]
        media[f"{LAYERS}/final_gaps"] = wandb.Table(columns=["layer", *columns], data=data)
    xs, ys, keys = gaps.series()
    if keys:
        media[f"{LAYERS}/mean_gap_vs_theory"] = wandb.plot.line_series(
            xs=xs, ys=ys, keys=keys, xname="optimizer_step",
            title="BN running-mean gap per layer: measured vs predicted",
        )  # fmt: skip
    plan, counted = summary.get("plan") or {}, summary.get("counted") or {}
    if plan:
        columns = list(plan)
        data = [["planned", *plan.values()], ["counted", *(counted.get(k) for k in columns)]]
        media["accounting/plan"] = wandb.Table(columns=["", *columns], data=data)
    for png in sorted((Path(out_dir) / "report").glob("*.png")):
        media[f"report/{png.stem}"] = wandb.Image(str(png))
    return media


def save_files(run: Any, out_dir: Path, with_log: bool) -> None:
    """Hydra's ``.hydra/*.yaml`` (and, when W&B does not capture the console, the job's log)
    into the run's files, as copies: an offline run stays whole if the job folder moves."""
    files = Path(run.dir)
    sources = sorted((Path(out_dir) / ".hydra").glob("*.yaml"))
    targets = [files / "hydra" / p.name for p in sources]
    if with_log:
        sources += sorted(Path(out_dir).glob("*.log"))
        targets += [files / p.name for p in sources[len(targets) :]]
    for src, dst in zip(sources, targets, strict=True):
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        # already inside the run's folder: W&B publishes it without linking (and no warning)
        run.save(str(dst), base_path=str(files), policy="now", glob=False)


def log_checkpoint(run: Any, path: Path, summary: Mapping[str, Any]) -> None:
    """The job's last checkpoint (``path``) as a ``model`` artifact (alias ``last``)."""
    import wandb

    if not path.is_file():
        return
    counted = summary.get("counted") or {}
    meta = {"status": summary.get("status"), "optimizer_step": counted.get("total_steps")}
    artifact = wandb.Artifact(f"checkpoint-{run.id}", type="model", metadata=meta)
    artifact.add_file(str(path))
    run.log_artifact(artifact, aliases=["last"])
