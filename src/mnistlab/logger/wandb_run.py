"""What a W&B run holds beyond its rows: its name and group, its summaries, and the tables,
chart, pictures and files it receives once, when the job finishes.

The defaults read well in W&B's run table. A run of a sweep is named by its values of the
swept keys (``optimizer.lr=0.05,trainer.seed=1``); a lone run by its overrides. The group is
the job's overrides less ``trainer.seed`` and the keys that change nothing trained (threads,
progress, logging, resume), so the seeds of one configuration form one group, in a sweep or
not. A job cannot see the other jobs, but Hydra writes the sweep's config to
``<sweep dir>/multirun.yaml`` before the first job starts: the swept keys come from there (the
sweep arguments in ``hydra.overrides.task`` and the presets' ``hydra.sweeper.params``), or,
where a sweeper writes no such file (Optuna), from the job's own ``hydra.sweeper.params``.

wandb and Hydra are imported inside the functions that need them (see :mod:`mnistlab.logger.sinks`).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnistlab.core.files import flatten
from mnistlab.logger.keys import layer_key, module_path, shown_row

log = logging.getLogger("mnistlab")

# W&B keeps best and final of these in the run summary (``val/acc.max``, ``val/acc.last``),
# validation first: what a sweep selects on, then the test set it reports
SUMMARIES = {
    "val/acc": "max,last",
    "val/loss": "min,last",
    "test/acc": "max,last",
    "test/loss": "min,last",
}
LABEL_CHARS = 128  # W&B's limit for a name or group; a longer label is cut and made unique
LAYERS = "bn_layers"  # W&B's section for the per-layer BN table and chart
# Overrides that change nothing a run trains: left out of the group, so its seeds stay together
NOT_TRAINED = ("trainer.seed", "trainer.resume", "trainer.progress", "trainer.num_threads",
               "logger", "hydra", "report")  # fmt: skip


@dataclass(frozen=True)
class Identity:
    """How a run is found in W&B: its group, its name, its command-line overrides, and the
    sweep folder when the job is one of a sweep's."""

    group: str
    name: str
    overrides: tuple[str, ...] = ()
    sweep: Path | None = None


def identity(out_dir: Path, name: str | None = None, group: str | None = None) -> Identity:
    """This Hydra job's group and name: ``name`` and ``group`` when given, else the defaults of
    the module's docstring. Outside Hydra (a DDP worker started by hand) the run folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    out_dir = Path(out_dir).resolve()
    if not HydraConfig.initialized():
        return Identity(group or folder_label(out_dir), name or out_dir.name)
    hc = HydraConfig.get()
    overrides = tuple(hc.overrides.task)
    grouped = label(chosen(overrides, drop=NOT_TRAINED), digits=8)
    if hc.mode != RunMode.MULTIRUN:
        name = name or label(overrides) or out_dir.name
        return Identity(group or grouped or folder_label(out_dir), name, overrides)
    sweep_dir = Path(hc.sweep.dir).resolve()
    keys, started = sweep_of(sweep_dir / "multirun.yaml")
    keys = keys or sweeps_of(hc)  # Optuna writes no multirun.yaml: its params are here
    name = name or label(chosen(overrides, keep=keys)) or label(overrides) or out_dir.name
    group = group or grouped or group_name(keys, started, sweep_dir)
    return Identity(group, name, overrides, sweep_dir)


def sweep_of(multirun_yaml: Path) -> tuple[list[str], float | None]:
    """The swept keys of the sweep whose config Hydra saved at ``multirun_yaml``, and when it
    was saved (the sweep's start); no keys and no time if the file is not there."""
    from omegaconf import OmegaConf

    if not multirun_yaml.is_file():
        return [], None
    return swept_keys(OmegaConf.load(multirun_yaml)), multirun_yaml.stat().st_mtime


def swept_keys(sweep_cfg: Any) -> list[str]:
    """The keys a sweep varies, from its composed config (what ``multirun.yaml`` holds)."""
    return sweeps_of(sweep_cfg.hydra)


def sweeps_of(hydra: Any) -> list[str]:
    """The keys a sweep varies, from a ``hydra`` node (the sweep's, or any of its jobs'): its
    sweep arguments (``optimizer.lr=0.1,0.2``) and the sweeps in ``hydra.sweeper.params``
    (where presets such as ``+experiment=bn_momentum`` put theirs), as Hydra's override parser
    reads them. Presets' params first, as the sweeper orders them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    params = hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=False) if params else {}
    lines = [f"{k}={v}" for k, v in params.items() if v is not None]
    lines += list(hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(lines)
    return list(dict.fromkeys(o.key_or_group for o in parsed if o.is_sweep_override()))


def chosen(
    overrides: Sequence[str], keep: Iterable[str] | None = None, drop: Iterable[str] = ()
) -> list[str]:
    """The overrides whose key is in ``keep`` (all when None) and neither is nor lies under a
    key in ``drop``, each as ``key=value`` with a float's value to 4 significant digits."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    wanted, unwanted = (None if keep is None else set(keep)), tuple(drop)
    out = []
    for line, o in zip(overrides, OverridesParser.create().parse_overrides(list(overrides)),
                       strict=True):  # fmt: skip
        key = o.key_or_group
        if (wanted is not None and key not in wanted) or _under(key, unwanted):
            continue
        value = o.value()
        out.append(f"{key}={value:.4g}" if isinstance(value, float) else line.lstrip("+~"))
    return out


def _under(key: str, prefixes: Sequence[str]) -> bool:
    """Whether ``key`` is one of ``prefixes`` or lies below one (``.`` or ``/``)."""
    return any(key == p or key.startswith((f"{p}.", f"{p}/")) for p in prefixes)


def label(items: Sequence[str], digits: int = 0) -> str:
    """``a=1,b=2``: the items joined as Hydra's ``override_dirname`` joins them. Past
    :data:`LABEL_CHARS`, the first items, ``+N more`` and (with ``digits``) a hash of the
    whole, so two long labels never read the same."""
    whole = ",".join(items)
    if len(whole) <= LABEL_CHARS:
        return whole
    tag = f" #{hashlib.sha1(whole.encode()).hexdigest()[:digits]}" if digits else ""
    for kept in range(len(items) - 1, -1, -1):
        text = ",".join(items[:kept]) + f" +{len(items) - kept} more{tag}"
        if len(text) <= LABEL_CHARS:
            return text.lstrip()
    return whole[: LABEL_CHARS - len(tag)] + tag


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


def for_wandb(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row as W&B gets it: per-layer BN keys in their layer's own section, named by module
    path (``net.2/mean_gap_mean``), so the ``bn`` section keeps the aggregates.
    ``metrics.jsonl`` keeps the original keys."""
    return shown_row(row)


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
                    keys.append(f"{module_path(layer)} {what}")
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
