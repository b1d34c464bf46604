"""Rows on overheads, as shares of training time: exact BN statistics, W&B offline and the
per-epoch evaluation, on the default run and on an MNIST mlp run."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .common import NA, Bench, Row, pct
from .runs import mnist_overrides, ours


def row_overheads_default(b: Bench) -> list[Row]:
    """Shares on the default run (digits; 1 epoch when quick)."""
    return _shares(b, "default", [] if not b.quick else ["trainer.epochs=1"])


def row_overheads_mnist(b: Bench) -> list[Row]:
    """Shares on an mlp over MNIST-format data."""
    n, e = b.n(10000, 1000), b.n(2, 1)
    return _shares(
        b,
        "mnist_mlp",
        [
            "dataset=mnist",
            f"dataset.root={b.root}",
            "dataset.download=false",
            f"dataset.limit_train={n}",
            "model=mlp",
            f"trainer.epochs={e}",
        ],
    )


def _shares(b: Bench, label: str, overrides: list[str]) -> list[Row]:
    """The BN-statistics, W&B and evaluation share rows of one config."""
    repeats = 1 if b.quick else 5  # W&B's service process makes single runs noisy
    plain: list[tuple[dict[str, Any], float]] = []
    wandb: list[tuple[dict[str, Any], float, Path]] = []
    wandb_ok = importlib.util.find_spec("wandb") is not None
    for _ in range(repeats):
        s, t, _ = ours(b, overrides)
        plain.append((s, t))
        if wandb_ok:
            wandb.append(ours(b, [*overrides, "logger=wandb", "logger.wandb.mode=offline"]))
    timings = min(plain, key=lambda p: p[1])[0]["timings"]
    return [
        _bn_stats_share(label, timings),
        _wandb_share(label, plain, wandb),
        _eval_share(label, timings),
    ]


def _bn_stats_share(label: str, timings: dict[str, Any]) -> Row:
    # exact BN statistics: the pass's own time (timings.bn_stats_s) over the training time
    share = timings["bn_stats_s"] / timings["train_s"]
    return Row(
        f"share_bn_stats_{label}",
        f"{timings['bn_stats_s']:.3f} s of {timings['train_s']:.3f} s",
        ratio=pct(share),
        target="<= 10%",
        ok=share <= 0.10,
        note="default bn_stats cadence; timings.bn_stats_s / train_s",
    )


def _wandb_share(
    label: str,
    plain: list[tuple[dict[str, Any], float]],
    wandb: list[tuple[dict[str, Any], float, Path]],
) -> Row:
    # W&B offline: step time (train_s) with the sink vs without it; start and finish beside
    if not wandb or not all((w[2] / "wandb").is_dir() for w in wandb):
        return Row(f"share_wandb_{label}", NA, target="<= 5%")
    w_best = min(wandb, key=lambda w: w[0]["timings"]["train_s"])[0]["timings"]
    t_w, t_0 = w_best["train_s"], min(p[0]["timings"]["train_s"] for p in plain)
    share = (t_w - t_0) / t_0
    start_finish = w_best.get("wandb_init_s", 0.0) + w_best.get("wandb_finish_s", 0.0)
    return Row(
        f"share_wandb_{label}",
        f"{t_w:.3f} s vs {t_0:.3f} s of training",
        ratio=pct(share),
        target="<= 5%",
        ok=share <= 0.05,
        note="logger=wandb logger.wandb.mode=offline vs logger=none, train_s (best of "
        f"{len(plain)}); W&B start + finish outside training: {start_finish:.2f} s per run",
    )


def _eval_share(label: str, timings: dict[str, Any]) -> Row:
    share = timings["eval_s"] / timings["train_s"]
    return Row(
        f"share_eval_{label}",
        f"{timings['eval_s']:.3f} s of {timings['train_s']:.3f} s",
        ratio=pct(share),
        note="per-epoch test evaluation inside the training time",
    )


def row_bn_points(b: Bench) -> list[Row]:
    """The BN points' share of training time (every point over the whole training set, or
    what the budget chose; timings.bn_stats_s / train_s) per model, on the digits (the default
    run, model swapped) and on MNIST-format data."""
    n, e = b.n(2000, 500), b.n(10, 4)
    out = []
    for model in ("mlp", "cnn", "lenet"):
        for label, overrides in (
            ("digits", [f"model={model}", *([] if not b.quick else ["trainer.epochs=4"])]),
            ("mnist", mnist_overrides(b, model, n, batch=32, epochs=e)),
        ):
            s, _, _ = ours(b, overrides)
            t = s["timings"]
            share = t["bn_stats_s"] / t["train_s"]
            out.append(
                Row(
                    f"share_bn_points_{label}_{model}",
                    f"{t['bn_stats_s']:.3f} s of {t['train_s']:.3f} s",
                    ratio=f"{share:.3f}",
                    target="<= 0.10",
                    ok=share <= 0.10,
                    note=f"{'; '.join(o for o in overrides if 'root' not in o)}",
                )
            )
    return out
