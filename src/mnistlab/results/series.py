"""The numbers the report's pictures draw: pure functions from a run's files to series.

Each function turns ``metrics.jsonl`` rows, ``summary.json`` or a checkpoint into plain lists
and dataclasses, and :mod:`mnistlab.results.pictures` draws them. Kept apart so the tests can check
what is drawn (the plotted gap is the logged gap; the drawn windows are the plan's) without
reading pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from mnistlab.engine.steps import StepPlan

X = "optimizer_step"  # every report picture's x-axis: optimizer updates, the unit of the plan


@dataclass(frozen=True)
class Series:
    """Points of one metric over optimizer steps, in logged order."""

    x: list[float]
    y: list[float]

    def __len__(self) -> int:
        return len(self.x)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def column(rows: list[dict[str, Any]], key: str) -> Series:
    """``key`` over optimizer steps, from the rows that logged a finite value of it."""
    points = [(r[X], r[key]) for r in rows if _finite(r.get(key)) and X in r]
    return Series([p[0] for p in points], [p[1] for p in points])


def last_value(rows: list[dict[str, Any]], summary: dict[str, Any], key: str) -> float | None:
    """A final metric: ``summary.json``'s ``final`` if it has it, else the last row's."""
    value = summary.get("final", {}).get(key)
    if _finite(value):
        return float(value)
    found = column(rows, key)
    return float(found.y[-1]) if found.y else None


# --- BatchNorm ----------------------------------------------------------------------------------

BN_SERIES = (
    "mean_gap_mean",
    "pred_mean_gap_mean",
    "pred_mean_gap_noise",
    "pred_mean_gap_bias",
    "logvar_ratio_mean",
    "pred_logvar_ratio_mean",
    "gap_vs_pred",
    "pred_init_weight",
)


def bn_layer_names(rows: list[dict[str, Any]]) -> list[str]:
    """The BN layers a run measured (``bn/<layer>/mean_gap_mean``), in logged order."""
    names: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k.startswith("bn/") and k.endswith("/mean_gap_mean"):
                names[k[3 : -len("/mean_gap_mean")]] = None
    return list(names)


def bn_series(rows: list[dict[str, Any]]) -> dict[str, dict[str, Series]]:
    """Per layer, each of :data:`BN_SERIES` over optimizer steps, as ``metrics.jsonl`` has it."""
    return {
        layer: {m: column(rows, f"bn/{layer}/{m}") for m in BN_SERIES}
        for layer in bn_layer_names(rows)
    }


@dataclass(frozen=True)
class Recalibration:
    """PreciseBN at the end of a run: the gaps and the test accuracy before and after."""

    gap_before: float
    gap_after: float
    logvar_before: float
    logvar_after: float
    acc_before: float
    acc_after: float


def recalibration(rows: list[dict[str, Any]], summary: dict[str, Any]) -> Recalibration | None:
    """The PreciseBN numbers, or None when ``bn_stats.recalibrate`` was off."""
    keys = (
        "bn/gap_mean",
        "bn/gap_mean_after_recal",
        "bn/logvar_ratio_mean",
        "bn/logvar_ratio_mean_after_recal",
        "bn/test_acc_before_recal",
        "bn/test_acc_after_recal",
    )
    values = [last_value(rows, summary, k) for k in keys]
    if any(v is None for v in values):
        return None
    return Recalibration(*values)  # type: ignore[arg-type]


def bn_momentum(summary: dict[str, Any]) -> float | None:
    """The run's ``model.bn_momentum`` (None: PyTorch's cumulative average)."""
    return summary.get("config", {}).get("model", {}).get("bn_momentum")


# --- step accounting ----------------------------------------------------------------------------


def plan_of(summary: dict[str, Any]) -> StepPlan:
    """The run's :class:`StepPlan`, rebuilt from its inputs in ``summary.json``'s ``plan``."""
    plan = summary["plan"]
    return StepPlan(**{f.name: plan[f.name] for f in fields(StepPlan)})


@dataclass(frozen=True)
class RankEpoch:
    """One rank's epoch: micro-batch sizes grouped into accumulation windows (one optimizer
    step each), the repeated samples that pad its shard, and the samples drop_last cut."""

    rank: int
    windows: list[list[int]]
    padding: int  # the last ``padding`` samples of the shard repeat the dataset's head
    dropped_tail: int  # a short last micro-batch that drop_last discards


def epoch_layout(plan: StepPlan) -> list[RankEpoch]:
    """Every rank's epoch from the plan's own numbers (``window_sizes``, batch sizes).

    DistributedSampler pads the shuffled index list to ``samples_per_rank x world`` by
    repeating its head and deals position p to rank ``p % world``: the padded positions
    (p >= N) are the last ones of the ranks that get them."""
    sizes = [plan.batch_size] * plan.micro_batches_per_epoch
    if sizes:
        sizes[-1] = plan.last_micro_batch_size
    windows, start = [], 0
    for n in plan.window_sizes():
        windows.append(sizes[start : start + n])
        start += n
    dropped = plan.samples_per_rank - plan.samples_per_rank_per_epoch_used
    out = []
    for rank in range(plan.world_size):
        real = max(0, math.ceil((plan.num_samples - rank) / plan.world_size))
        padding = 0 if plan.drop_last else max(0, plan.samples_per_rank - real)
        out.append(RankEpoch(rank, windows, padding, dropped))
    return out


def shown(count: int, most: int, head: int) -> tuple[list[int], int]:
    """Which of ``count`` items a picture draws: all up to ``most``, else the first ``head``
    and the last ``most - head``; returns the indices and how many are left out between."""
    if count <= most:
        return list(range(count)), 0
    tail = most - head
    return [*range(head), *range(count - tail, count)], count - most


def plan_lines(plan: StepPlan, counted: dict[str, Any] | None = None) -> list[str]:
    """The plan's numbers as the text beside the epoch picture, the textbook value with them."""
    mb, acc = plan.micro_batches_per_epoch, plan.grad_accum
    steps = f"total optimizer steps   {plan.total_steps}"
    if counted and "total_steps" in counted:
        ok = "matches" if counted["total_steps"] == plan.total_steps else "DIFFERS"
        steps += f"  (counted {counted['total_steps']}: {ok})"
    return [
        f"N = {plan.num_samples} samples, {plan.epochs} epoch(s)",
        f"batch {plan.batch_size} x world {plan.world_size} x accum {acc}"
        f" = {plan.effective_batch_size} per step",
        f"samples per rank        {plan.samples_per_rank}",
        f"  padding (repeats)     {plan.padding}",
        f"  dropped by sampler    {plan.dropped_by_sampler}",
        f"micro-batches / epoch   {mb}  (last: {plan.last_micro_batch_size})",
        f"steps / epoch           {plan.steps_per_epoch} = ceil({mb} / {acc})",
        steps,
        f"textbook N*epochs/(world*batch*accum) = {plan.textbook_steps:.6g}",
        f"BN updates per rank     {plan.bn_updates} (one per micro-batch)",
        f"samples seen (all ranks) {plan.samples_seen}",
    ]


@dataclass(frozen=True)
class JobSteps:
    """One sweep job's accounting: what a step-accounting sweep compares."""

    label: str
    micro_batches: int  # per rank, the whole run
    steps: int
    textbook: float


def job_steps(label: str, summary: dict[str, Any]) -> JobSteps:
    plan = plan_of(summary)
    return JobSteps(label, plan.total_micro_batches, plan.total_steps, plan.textbook_steps)


def plan_shape(summary: dict[str, Any]) -> str:
    """``batch 64 x world 1 x accum 2``: what a step-accounting sweep varies."""
    p = summary["plan"]
    return f"batch {p['batch_size']} x world {p['world_size']} x accum {p['grad_accum']}"


# --- regularization -----------------------------------------------------------------------------


def regularized_weights(checkpoint: Path) -> np.ndarray:
    """The regularized weights in ``checkpoint``, chosen as the run chose them.

    The model is rebuilt from the checkpoint's config (:func:`mnistlab.engine.models.build`), its
    state loaded, and :func:`mnistlab.engine.regularizers.regularized_parameters` picks the weights:
    the same selection as the run's ``weights/*`` metrics."""
    import torch
    from omegaconf import OmegaConf

    from mnistlab.engine import checkpoint as ckpt
    from mnistlab.engine import data, models, regularizers

    state = ckpt.read(checkpoint)
    cfg = OmegaConf.create(state["config"])
    shape, classes = data.SHAPES[cfg.dataset.name]
    model = models.build(cfg.model, shape, classes, cfg.regularizer.dropout)
    model.load_state_dict(state["model"])
    params = regularizers.regularized_parameters(model, cfg.regularizer.exclude_bn_and_bias)
    if not params:
        return np.zeros(0)
    return torch.cat([p.detach().reshape(-1) for p in params]).double().numpy()


@dataclass(frozen=True)
class Histogram:
    """Weights that are exactly zero, and a histogram of the others."""

    zeros: int
    edges: np.ndarray
    counts: np.ndarray

    @property
    def total(self) -> int:
        return self.zeros + int(self.counts.sum())


def weight_histogram(weights: np.ndarray, bins: int = 81) -> Histogram:
    """Exact zeros apart (L1's proximal step makes them), the rest in ``bins`` symmetric bins."""
    zero = weights == 0
    rest = weights[~zero]
    top = float(np.abs(rest).max()) if rest.size else 1.0
    counts, edges = np.histogram(rest, bins=bins, range=(-top, top))
    return Histogram(int(zero.sum()), edges, counts)


WEIGHT_KEYS = (
    "weights/sparsity_exact",
    "weights/sparsity_1e-3",
    "weights/l1_norm",
    "weights/l2_norm",
)
ACCURACY_KEYS = ("train/acc", "train_slice/acc", "val/acc", "test/acc", "train_test_gap")
LOSS_KEYS = ("train/loss", "train_slice/loss", "val/loss", "test/loss")


def columns(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Series]:
    return {k: column(rows, k) for k in keys}
