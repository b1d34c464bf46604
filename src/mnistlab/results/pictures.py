"""The report's pictures, drawn from :mod:`mnistlab.results.series` on matplotlib's Agg canvas.

Each ``draw_*`` takes plain series and returns a :class:`~matplotlib.figure.Figure`; nothing
here reads files or touches pyplot's global state (no display, no backend switch), so a
report can be drawn inside a training process. :func:`save_png` writes a figure atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

from mnistlab.core.files import atomic_write_bytes
from mnistlab.results.series import Histogram, JobSteps, RankEpoch, Recalibration, Series, shown

WINDOW_COLORS = ("#4C72B0", "#9DB9E3")  # alternate accumulation windows
PAD_COLOR, DROP_COLOR = "#DD8452", "#8C8C8C"
MAX_WINDOWS, HEAD_WINDOWS = 14, 10  # an epoch drawn whole up to 14 windows, else 10 + ... + 4
MAX_RANKS, HEAD_RANKS = 8, 4


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas: no pyplot, no display."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Render ``fig`` to PNG in memory and write it atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def _line(ax: Axes, s: Series, log: bool = False, **kw: Any) -> None:
    """A series; on a log axis its non-positive points are left out (a log has no 0)."""
    pts = [(x, y) for x, y in zip(s.x, s.y, strict=True) if y > 0 or not log]
    if pts:
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="." if len(xs) <= 40 else None, **kw)


def _finish(ax: Axes, title: str, ylabel: str, log: bool = False, xlabel: str = "") -> None:
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both" if log else "major")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


STEP = "optimizer step"


# --- BatchNorm ----------------------------------------------------------------------------------


def draw_bn(
    bn: dict[str, dict[str, Series]],
    recal: Recalibration | None,
    subtitle: str = "",
    noise_share: Series | None = None,
) -> Figure:
    """Per layer: the measured mean gap against the theory's parts (EMA noise, the initial
    bias ``(1 - m)^t |mu_0 - mu|``, their sum only where the bias shows, and what the theory
    leaves unexplained: drift), the |log-variance ratio|, and measured / predicted with its
    y = 1 line; below, the initial value's weight and PreciseBN. ``noise_share``
    (``bn/probe_noise_share``): points over the whole set (0) are filled, subset ones hollow."""
    whole = (
        {x for x, y in zip(noise_share.x, noise_share.y, strict=True) if y == 0}
        if (noise_share is not None)
        else None
    )
    layers = list(bn)
    fig = new_figure(14, 2.9 * len(layers) + 3.2)
    grid = fig.add_gridspec(len(layers) + 1, 3)
    first: Axes | None = None
    for i, layer in enumerate(layers):
        s = bn[layer]
        ax = fig.add_subplot(grid[i, 0], sharex=first)
        first = first or ax
        _line(ax, s["mean_gap_mean"], True, label="measured", color="C0", lw=2)
        _mark_probes(ax, s["mean_gap_mean"], whole)
        _line(ax, s["pred_mean_gap_noise"], True, label="theory: EMA noise", color="C2", ls=":")
        _line(ax, s["pred_mean_gap_bias"], True, label="theory: initial bias (1-m)^t |mu_0 - mu|",
              color="C3", ls="-.")  # fmt: skip
        _line(ax, _where_bias_shows(s), True, label="theory: bias + noise", color="k", ls="--")
        _line(ax, _excess(s), True, label="beyond theory: drift", color="C1", lw=1)
        _finish(ax, f"BN layer {layer}: running mean gap", "|gap| / sd (mean over ch.)", True)
        _floor(ax, [s["mean_gap_mean"], s["pred_mean_gap_mean"]])
        ax = fig.add_subplot(grid[i, 1], sharex=first)
        _line(ax, s["logvar_ratio_mean"], True, label="measured", color="C1", lw=2)
        _line(ax, s["pred_logvar_ratio_mean"], True, label="theory", color="k", ls="--")
        _finish(ax, f"BN layer {layer}: running variance", "|log(running var / var)|", True)
        ax = fig.add_subplot(grid[i, 2], sharex=first)
        _line(ax, s["gap_vs_pred"], True, label="measured / theory", color="C4", lw=2)
        ax.axhline(1.0, color="k", lw=1, ls="--", label="1: noise or initial bias")
        ax.plot([], [], " ", label="well above 1: drift (weights outrun the EMA)")
        _finish(ax, f"BN layer {layer}: measured / predicted mean gap", "ratio", True)
        _ratio_ticks(ax, s["gap_vs_pred"])
    ax = fig.add_subplot(grid[-1, 0], sharex=first)
    for j, layer in enumerate(layers):
        _line(ax, bn[layer]["pred_init_weight"], True, label=f"layer {layer}", color=f"C{j}")
    _finish(ax, "weight still on the initial value, (1 - m)^t", "(1 - m)^t", True, STEP)
    _draw_recal(fig.add_subplot(grid[-1, 1:]), recal)
    fig.suptitle("BatchNorm running statistics against the exact ones" + subtitle, fontsize=12)
    for a in fig.axes[: 3 * len(layers)]:
        a.set_xlabel(STEP)
    return fig


def _mark_probes(ax: Axes, s: Series, whole: set[float] | None) -> None:
    """Filled markers on points measured over the whole training set, hollow on subset ones."""
    if whole is None:
        return
    on = [(x, y) for x, y in zip(s.x, s.y, strict=True) if y > 0 and x in whole]
    off = [(x, y) for x, y in zip(s.x, s.y, strict=True) if y > 0 and x not in whole]
    if on:
        ax.scatter(*zip(*on, strict=True), s=14, color="C0", zorder=3, label="whole set")
    if off:
        ax.scatter(*zip(*off, strict=True), s=14, facecolors="none", edgecolors="C0", zorder=3,
                   label="subset (its noise in the theory)")  # fmt: skip


def _where_bias_shows(s: dict[str, Series], rel: float = 0.05) -> Series:
    """The theory's total only where it differs from noise alone by more than ``rel``: else
    it would draw on top of the noise line."""
    total, noise = s["pred_mean_gap_mean"], s["pred_mean_gap_noise"]
    noise_at = dict(zip(noise.x, noise.y, strict=True))
    pts = [(x, y) for x, y in zip(total.x, total.y, strict=True)
           if y > (1 + rel) * noise_at.get(x, 0.0)]  # fmt: skip
    return Series([p[0] for p in pts], [p[1] for p in pts])


def _excess(s: dict[str, Series]) -> Series:
    """Measured minus predicted mean gap where positive: what noise and bias leave
    unexplained, the drift (weights moving faster than the average follows)."""
    pred = dict(zip(s["pred_mean_gap_mean"].x, s["pred_mean_gap_mean"].y, strict=True))
    got = s["mean_gap_mean"]
    pts = [(x, y - pred[x]) for x, y in zip(got.x, got.y, strict=True) if x in pred]
    return Series([p[0] for p in pts], [max(p[1], 0.0) for p in pts])


def _floor(ax: Axes, main: list[Series], decades: float = 2.0) -> None:
    """Show ``decades`` below the smallest of the ``main`` lines: a term that vanishes (the
    initial bias, (1 - m)^t) leaves the frame instead of squashing the comparison."""
    low = [y for s in main for y in s.y if y > 0]
    if low:
        ax.set_ylim(bottom=min(low) / 10**decades)


def _ratio_ticks(ax: Axes, s: Series) -> None:
    """A ratio's log axis with plain ticks (0.5, 1, 2, ...) and 1 always in view."""
    ys = [y for y in s.y if y > 0] + [1.0]
    low, high = min(min(ys) / 1.3, 0.5), max(max(ys) * 1.3, 2.0)
    ax.set_ylim(low, high)
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 3, 5, 10, 20, 50, 100) if low <= t <= high]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def _draw_recal(ax: Axes, recal: Recalibration | None) -> None:
    if recal is None:
        ax.axis("off")
        ax.text(
            0.5,
            0.5,
            "PreciseBN did not run: add bn_stats.recalibrate=true to replace the\n"
            "running statistics by the exact ones at the end and see before / after here",
            ha="center",
            va="center",
            fontsize=9,
            transform=ax.transAxes,
        )
        return
    names = ["mean gap", "|log var ratio|"]
    before = [recal.gap_before, recal.logvar_before]
    after = [recal.gap_after, recal.logvar_after]
    xs = range(len(names))
    b1 = ax.bar([x - 0.2 for x in xs], before, 0.4, label="EMA (before)", color="C0")
    b2 = ax.bar([x + 0.2 for x in xs], after, 0.4, label="PreciseBN (after)", color="C2")
    ax.bar_label(b1, fmt="%.2g", fontsize=8)
    ax.bar_label(b2, fmt="%.2g", fontsize=8)
    ax.set_xticks(list(xs), names)
    acc = f"test acc {recal.acc_before:.4f} -> {recal.acc_after:.4f}"
    _finish(ax, f"PreciseBN at the end (mean over layers): {acc}", "value (log)", True)


def draw_bn_momenta(panels: Sequence[tuple[str, dict[str, dict[str, Series]]]]) -> Figure:
    """One column per BN momentum on shared axes: the measured gaps (solid) and the theory's
    (dashed) of every layer, mean above, variance below."""
    fig = new_figure(3.4 * len(panels) + 1, 6.4)
    axes = fig.subplots(2, len(panels), sharex=True, sharey="row", squeeze=False)
    rows = (
        ("mean_gap_mean", "pred_mean_gap_mean", "running mean: |gap| / sd"),
        ("logvar_ratio_mean", "pred_logvar_ratio_mean", "|log(running var / var)|"),
    )
    for col, (title, bn) in enumerate(panels):
        for row, (measured, predicted, ylabel) in enumerate(rows):
            ax = axes[row][col]
            for j, layer in enumerate(bn):
                _line(ax, bn[layer][measured], True, color=f"C{j}", lw=2, label=f"layer {layer}")
                _line(ax, bn[layer][predicted], True, color=f"C{j}", ls="--")
            _finish(
                ax,
                title if row == 0 else "",
                ylabel if col == 0 else "",
                True,
                STEP if row == 1 else "",
            )
            if (col or row) and ax.get_legend() is not None:
                ax.get_legend().remove()  # one legend: the first panel's
    fig.suptitle("BatchNorm gap by momentum m (solid: measured, dashed: theory)", fontsize=12)
    return fig


# --- step accounting ----------------------------------------------------------------------------


def _epoch_legend() -> list[Patch]:
    return [
        Patch(facecolor=WINDOW_COLORS[0], edgecolor="k", label="accumulation window = 1 step"),
        Patch(facecolor=PAD_COLOR, hatch="///", label="padding (repeated samples)"),
        Patch(facecolor="white", edgecolor=DROP_COLOR, hatch="xx", label="dropped (drop_last)"),
    ]


def draw_epoch(layout: list[RankEpoch], batch_size: int, lines: list[str]) -> Figure:
    """One epoch per rank: micro-batches (width by samples) in accumulation windows, one
    optimizer step each; padding and drop_last's cut hatched; the plan's numbers beside."""
    ranks, ranks_left = shown(len(layout), MAX_RANKS, HEAD_RANKS)
    fig = new_figure(14, max(3.4, 1.5 + 0.9 * (len(ranks) + (ranks_left > 0))))
    ax, text = fig.subplots(1, 2, width_ratios=[2.4, 1])
    windows = layout[0].windows
    index, left = shown(len(windows), MAX_WINDOWS, HEAD_WINDOWS)
    ys = [-1.4 * (row + (row >= HEAD_RANKS and ranks_left > 0)) for row in range(len(ranks))]
    for y, r in zip(ys, ranks, strict=True):
        _draw_rank(ax, layout[r], y, index, left, batch_size)
    if ranks_left:
        ax.text(
            0,
            -1.4 * HEAD_RANKS,
            f"ranks {HEAD_RANKS}..{ranks[HEAD_RANKS] - 1}: the same "
            "windows (padding, if any, on the last ranks)",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(ys, [f"rank {r}" for r in ranks])
    ax.set_xticks([])
    ax.set_xlabel(
        "this rank's epoch in order: micro-batches (width = samples), numbered by optimizer step"
    )
    ax.legend(handles=_epoch_legend(), loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=3,
              fontsize=8, frameon=False)  # fmt: skip
    micro = sum(len(w) for w in windows)
    ax.set_title(
        f"One epoch: {micro} micro-batches per rank in {len(windows)} windows = "
        f"{len(windows)} optimizer steps",
        fontsize=10,
    )
    ax.margins(x=0.01, y=0.3 / len(ys))
    text.axis("off")
    text.text(
        0, 1, "\n".join(lines), va="top", family="monospace", fontsize=8.5, transform=text.transAxes
    )
    text.set_title("the plan (summary.json: plan)", fontsize=10, loc="left")
    return fig


BOX = 0.7  # a rank's row height


def _box(ax: Axes, x: float, y: float, width: float, gid: str, **style: Any) -> None:
    """One rectangle of a rank's row; ``gid`` names what it is (tests count the windows)."""
    ax.add_patch(Rectangle((x, y - BOX / 2), width, BOX, gid=gid, **style))


def _draw_rank(
    ax: Axes, rank: RankEpoch, y: float, index: list[int], left: int, batch: int
) -> None:
    """One rank's row: ``index`` windows drawn, ``left`` of them elided after the head, then
    its padding and drop_last's cut."""
    x = 0.0
    for n, j in enumerate(index):
        if left and n == HEAD_WINDOWS:
            ax.text(x + 1.0, y, f"... {left}\nsteps", ha="center", va="center", fontsize=7)
            x += 2.0
        sizes = rank.windows[j]
        width = sum(sizes) / batch
        _box(ax, x, y, width, "window", facecolor=WINDOW_COLORS[j % 2], edgecolor="k", lw=1.2)
        edge = x
        for size in sizes[:-1]:  # micro-batch boundaries inside the window
            edge += size / batch
            ax.plot([edge, edge], [y - BOX / 2, y + BOX / 2], color="white", lw=1)
        ax.text(x + width / 2, y + BOX / 2 + 0.03, str(j + 1), ha="center", va="bottom", fontsize=7)
        x += width
    last = rank.windows[-1][-1]
    notes = [f"last micro-batch: {last}"] if last != batch else []
    if rank.padding:
        pad = rank.padding / batch
        _box(
            ax, x - pad, y, pad, "padding", facecolor=PAD_COLOR, hatch="///", edgecolor="k", lw=0.5
        )
        notes.append(f"{rank.padding} repeated")
    if rank.dropped_tail:
        style = {"facecolor": "white", "edgecolor": DROP_COLOR, "hatch": "xx"}
        _box(ax, x, y, rank.dropped_tail / batch, "dropped", **style)
        notes.append(f"{rank.dropped_tail} dropped")
    if notes:
        ax.text(x, y - BOX / 2 - 0.03, ", ".join(notes), ha="right", va="top", fontsize=7)
    ax.autoscale_view()


def draw_sweep_steps(jobs: Sequence[JobSteps]) -> Figure:
    """Per job: iterations (micro-batches per rank), optimizer steps and the textbook count."""
    fig = new_figure(max(7.0, 1.6 * len(jobs) + 2), 5)
    ax = fig.add_subplot()
    series = (
        ("micro_batches", "iterations = BN updates (micro-batches per rank)", "C0"),
        ("steps", "optimizer steps", "C1"),
        ("textbook", "textbook N*epochs/(world*batch*accum)", "C7"),
    )
    values = [[getattr(j, key) for j in jobs] for key, _, _ in series]
    for k, ((_, label, color), ys) in enumerate(zip(series, values, strict=True)):
        xs = [i + (k - 1) * 0.27 for i in range(len(jobs))]
        bars = ax.bar(xs, ys, 0.27, label=label, color=color)
        ax.bar_label(bars, fmt="%.6g", fontsize=7)
    flat = [v for ys in values for v in ys if v > 0]
    log = bool(flat) and max(flat) / min(flat) > 20
    ax.set_xticks(range(len(jobs)), [j.label for j in jobs], fontsize=8)
    _finish(ax, "Step accounting per job of the sweep", "count over the run", log)
    return fig


# --- regularization and learning ----------------------------------------------------------------


def draw_regularization(
    hist: Histogram | None,
    weights: dict[str, Series],
    acc: dict[str, Series],
    title: str,
    final: str = "",
) -> Figure:
    """Final weight histogram (log counts, exact zeros apart), sparsity, norms, accuracies."""
    fig = new_figure(13, 8.5)
    (h, sp), (nm, ac) = fig.subplots(2, 2)
    _draw_histogram(h, hist)
    _line(sp, _percent(weights["weights/sparsity_exact"]), label="exactly 0", color="C3")
    _line(sp, _percent(weights["weights/sparsity_1e-3"]), label="|w| < 1e-3", color="C1")
    _finish(sp, "sparsity of the regularized weights", "% of weights", xlabel=STEP)
    _line(nm, weights["weights/l2_norm"], True, label="L2 norm", color="C0")
    _line(nm, weights["weights/l1_norm"], True, label="L1 norm", color="C2")
    _finish(nm, "norms of the regularized weights", "norm", True, STEP)
    _line(ac, acc["val/acc"], label="validation", color="C3")
    _line(ac, acc["test/acc"], label="test", color="C1")
    _line(ac, acc["train_slice/acc"], label="train (eval mode, test-sized slice)", color="C0")
    gap = ac.twinx()
    _line(gap, acc["train_test_gap"], color="C3", ls="--", label="train - test gap (right)")
    gap.set_ylabel("train - test gap", color="C3")
    _finish(
        ac, "accuracy at each evaluation" + (f"\n{final}" if final else ""), "accuracy", xlabel=STEP
    )
    ac.legend(
        *[
            a + b
            for a, b in zip(
                ac.get_legend_handles_labels(), gap.get_legend_handles_labels(), strict=True
            )
        ],
        fontsize=7,
        loc="lower right",
    )
    fig.suptitle(title, fontsize=12)
    return fig


def _percent(s: Series) -> Series:
    return Series(s.x, [100 * v for v in s.y])


def draw_histograms(panels: Sequence[tuple[str, Histogram | None]]) -> Figure:
    """One final weight histogram per job on shared axes (log counts, exact zeros in red)."""
    fig = new_figure(3.6 * len(panels) + 1, 4.2)
    axes = fig.subplots(1, len(panels), sharex=True, sharey=True, squeeze=False)[0]
    for ax, (title, hist) in zip(axes, panels, strict=True):
        _draw_histogram(ax, hist, title)
    fig.suptitle("Regularized weights at the end of each job", fontsize=12)
    return fig


def _draw_histogram(ax: Axes, hist: Histogram | None, title: str = "") -> None:
    if hist is None or hist.total == 0:
        ax.axis("off")
        ax.text(0.5, 0.5, "no checkpoint: no weight histogram", ha="center", transform=ax.transAxes)
        return
    width = hist.edges[1] - hist.edges[0]
    ax.stairs(hist.counts, hist.edges, fill=True, color="C0", alpha=0.8, label="nonzero weights")
    share = 100 * hist.zeros / hist.total
    ax.bar(
        [0.0],
        [max(hist.zeros, 1e-9)],
        width,
        color="C3",
        gid="zeros",
        label=f"exactly 0: {hist.zeros:,} ({share:.1f}%)",
    )
    title = title or f"regularized weights at the end ({hist.total:,})"
    _finish(ax, title, "count (log)", True, "weight")
    ax.set_ylim(bottom=0.5)


LEARNING = {  # split: (label, color, line width); validation first: the objective's split
    "val": ("validation (what a sweep selects on)", "C3", 2.0),
    "test": ("test (reported, never selected on)", "C2", 1.5),
    "train": ("train (train mode, mean since the previous row)", "C0", 1.5),
    "train_slice": ("train (eval mode, test-sized slice)", "C1", 1.5),
}


def draw_learning(loss: dict[str, Series], acc: dict[str, Series]) -> Figure:
    """Loss and accuracy over optimizer steps: validation, test, and training both as the
    running mean in train mode and in eval mode on a slice. A run without a validation split
    says so in the title."""
    fig = new_figure(13, 4.6)
    lo, ac = fig.subplots(1, 2)
    for split, (label, color, width) in LEARNING.items():
        _line(lo, loss[f"{split}/loss"], True, label=label, color=color, lw=width)
        _line(ac, acc[f"{split}/acc"], label=label, color=color, lw=width)
    _finish(lo, "loss", "cross-entropy (log)", True, STEP)
    _finish(ac, "accuracy", "accuracy", xlabel=STEP)
    has_val = any(len(s.y) for s in (loss["val/loss"], acc["val/acc"]))
    note = "" if has_val else " (no validation split: dataset.val_size=0)"
    fig.suptitle("Learning curves" + note, fontsize=12)
    return fig
