"""The gap between each BN layer's running statistics and the exact ones, per channel and
per layer, beside what the EMA theory (:mod:`mnistlab.bn.theory`) predicts for it.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mnistlab.bn.stats import INIT_MEAN, INIT_VAR, LayerStats
from mnistlab.bn.theory import folded_mean_np, init_weight, noise_factor
from mnistlab.engine.models import bn_layers, unwrap

GAP_KEYS = (
    "mean_gap_mean",
    "mean_gap_max",
    "logvar_ratio_mean",
    "logvar_ratio_max",
    "logvar_ratio_signed",
    "num_batches_tracked",
    "pred_mean_gap_mean",
    "pred_mean_gap_noise",
    "pred_mean_gap_bias",
    "pred_logvar_ratio_mean",
    "pred_init_weight",
    "gap_vs_pred",
)


def _per_channel(
    cols: np.ndarray, eps: np.ndarray, w0: np.ndarray, f2: np.ndarray, probe_noise: float
) -> np.ndarray:
    """Per channel, from the 8 rows of :func:`gap_metrics`' columns: |gap|, |log ratio|, log
    ratio, and the theory's expected |gap| (bias and noise, noise, bias) and |log ratio|.

    In units of what BN itself divides by, sqrt(var + eps): a channel that L1 or a dead ReLU
    left constant (var 0) then reads as a gap of ~0, not as 1e4 standard deviations."""
    mean, var, _bm_mean, bm_var, bv_mean, bv_var, rm, rv = cols
    var_c = var + eps
    std = np.sqrt(var_c)
    gap = np.abs(rm - mean) / std
    lvr = np.log((np.maximum(rv, 0.0) + eps) / var_c)
    # Mean: E[running] = w0 * mu_0 + (1 - w0) * E[batch mean], and a random batch's mean has
    # expectation mu itself: the bias is the initial value's, (1 - m)^t * (mu_0 - mu). (The
    # sub-batches' own average, bm_mean, differs from mu by the samples no whole sub-batch
    # holds, or by a probe's offset: sampling noise, counted in the noise terms.)
    bias = w0 * (INIT_MEAN - mean) / std
    noise = np.sqrt((f2 + probe_noise) * bm_var) / std
    # Variance: E[running] = w0 * 1 + (1 - w0) * E[batch var]; the log by the delta method.
    expect_rv = np.maximum(w0 * INIT_VAR + (1 - w0) * bv_mean, 0.0) + eps
    lv_center = np.log(expect_rv / var_c)
    lv_noise = np.sqrt(f2 * bv_var / expect_rv**2 + probe_noise * bv_var / var_c**2)
    return np.stack(
        [
            gap,
            np.abs(lvr),
            lvr,
            folded_mean_np(bias, noise),
            noise * math.sqrt(2 / math.pi),
            np.abs(bias),
            folded_mean_np(lv_center, lv_noise),
        ]
    )


def gap_metrics(
    model: nn.Module, stats: dict[str, LayerStats], probe_noise: float = 0.0
) -> dict[str, dict[str, float]]:
    """Measured gap between every layer's running statistics and ``stats``, and the theory's.

    ``probe_noise`` is Var(probe statistic) / Var(batch statistic) when ``stats`` come from a
    probe subset rather than the whole set (see :meth:`Monitor.probe_noise`): the probe's own
    sampling error then adds to the predicted gap. All layers are gathered into one tensor and
    read back once (no per-metric device syncs).
    """
    layers = bn_layers(unwrap(model))
    names = list(stats)
    if not names:
        return {}
    sizes = [layers[n].num_features for n in names]

    def columns(n: str) -> Tensor:  # (8, C) float64: everything one layer contributes
        d, bm, bv, layer = stats[n].data, stats[n].batch_mean, stats[n].batch_var, layers[n]
        run = torch.stack([layer.running_mean.detach(), layer.running_var.detach()]).to(d.mean)
        return torch.cat([torch.stack([d.mean, d.var, bm.mean, bm.var, bv.mean, bv.var]), run])

    # One read-back; the rest is small per-channel arithmetic, cheapest in numpy.
    cols = torch.cat([columns(n) for n in names], dim=1) if len(names) > 1 else columns(names[0])
    ts = [int(layers[n].num_batches_tracked) for n in names]
    w0s = [init_weight(layers[n].momentum, t) for n, t in zip(names, ts, strict=True)]
    f2s = [noise_factor(layers[n].momentum, t) for n, t in zip(names, ts, strict=True)]
    w0, f2 = np.repeat(w0s, sizes), np.repeat(f2s, sizes)

    eps = np.repeat([float(layers[n].eps) for n in names], sizes)
    with np.errstate(all="ignore"):  # nan where the pass saw too few values
        per_channel = _per_channel(cols.cpu().numpy(), eps, w0, f2, probe_noise)
        bounds = np.cumsum([0, *sizes])
        values = [
            [*per_channel[:, a:b].mean(1).tolist(), *per_channel[:2, a:b].max(1).tolist()]
            for a, b in itertools.pairwise(bounds)  # one layer's channels
        ]
    out: dict[str, dict[str, float]] = {}
    for name, v, t, w in zip(names, values, ts, w0s, strict=True):
        out[name] = {
            "mean_gap_mean": v[0],
            "mean_gap_max": v[7],
            "logvar_ratio_mean": v[1],
            "logvar_ratio_max": v[8],
            "logvar_ratio_signed": v[2],
            "num_batches_tracked": t,
            "pred_mean_gap_mean": v[3],
            "pred_mean_gap_noise": v[4],
            "pred_mean_gap_bias": v[5],
            "pred_logvar_ratio_mean": v[6],
            "pred_init_weight": w,
            "gap_vs_pred": v[0] / v[3] if v[3] > 0 else math.nan,
        }
    return out


def aggregate(
    per_layer: dict[str, dict[str, float]], suffix: str = "", with_theory: bool = True
) -> dict[str, float]:
    """Layer aggregates: means of the per-layer means, maxima of the maxima."""
    if not per_layer:
        return {}
    vals = list(per_layer.values())

    def mean(k: str) -> float:
        return sum(v[k] for v in vals) / len(vals)

    out = {
        "bn/gap_mean": mean("mean_gap_mean"),
        "bn/gap_max": max(v["mean_gap_max"] for v in vals),
        "bn/logvar_ratio_mean": mean("logvar_ratio_mean"),
        "bn/logvar_ratio_max": max(v["logvar_ratio_max"] for v in vals),
    }
    if with_theory:
        out["bn/pred_gap_mean"] = mean("pred_mean_gap_mean")
        out["bn/pred_logvar_ratio_mean"] = mean("pred_logvar_ratio_mean")
    return {k + suffix: v for k, v in out.items()}


def flatten(per_layer: dict[str, dict[str, float]]) -> dict[str, Any]:
    """``bn/<layer>/<metric>`` keys plus the aggregates, for a metrics row."""
    row: dict[str, Any] = {}
    for name, vals in per_layer.items():
        row.update({f"bn/{name}/{k}": v for k, v in vals.items()})
    row.update(aggregate(per_layer))
    return row
