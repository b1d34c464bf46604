"""BatchNorm running statistics: exact population statistics, gap metrics, EMA theory, PreciseBN.

A BatchNorm layer normalizes with batch statistics while training and keeps an exponential
moving average for inference, ``running = (1 - m) * running + m * batch_stat`` (PyTorch's
``momentum`` m is the weight of the new batch; ``None`` = cumulative average), starting at mean
0 / variance 1 and updated once per forward micro-batch. Those running values are estimates.
This module measures what they estimate: the mean and (unbiased) variance of every BN layer's
input over the training set (or a seeded probe subset), with the model in eval mode, i.e. with
every upstream layer as it behaves at test time.

The exact pass captures each BN input with a forward pre-hook, reduces every chunk with
``var_mean`` in float64, and merges chunks with Chan's parallel formula, so the result equals
one pass over all the data at once. Every statistic is a :class:`Moments` triple
``(count, mean, M2)`` of float64 tensors; :func:`chan_merge` combines two, and
:func:`merge_across_ranks` combines the ranks' shares (identity in a single process).

Beside the measurement sits the EMA theory: after t updates the initial value keeps weight
``(1 - m)^t``, and for a stationary input the EMA's noise variance is
``m / (2 - m) * (1 - (1 - m)^(2t))`` times the variance of one batch's statistic, which the
exact pass measures directly (sub-batches of the training batch size) instead of assuming
independent spatial positions. Knows nothing of Hydra or W&B.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

# PyTorch's initial running values; the theory's "initial bias" is relative to them.
INIT_MEAN, INIT_VAR = 0.0, 1.0
# Why the summary insists on it: the EMA advances once per forward micro-batch.
BN_UPDATES_NOTE = (
    "BatchNorm updates its running statistics once per forward micro-batch, not once per "
    "optimizer step: with gradient accumulation num_batches_tracked counts micro-batches"
)


class Moments(NamedTuple):
    """Per-channel ``(count, mean, M2)`` in float64; ``M2`` is the sum of squared deviations."""

    count: Tensor  # 0-d
    mean: Tensor  # (C,)
    m2: Tensor  # (C,)

    @staticmethod
    def empty(channels: int, device: torch.device | str = "cpu") -> Moments:
        z = torch.zeros(channels, dtype=torch.float64, device=device)
        return Moments(torch.zeros((), dtype=torch.float64, device=device), z, z.clone())

    @staticmethod
    def of(values: Tensor, dim: int | tuple[int, ...]) -> Moments:
        """Moments of ``values`` reduced over ``dim`` (one ``var_mean`` call, float64)."""
        v = values.double()
        var, mean = torch.var_mean(v, dim=dim, correction=0)
        n = v.numel() // max(1, mean.numel())
        count = torch.tensor(float(n), dtype=torch.float64, device=v.device)
        return Moments(count, mean, var * n)

    @property
    def var(self) -> Tensor:
        """Unbiased variance (PyTorch's ``running_var`` convention)."""
        return self.m2 / (self.count - 1).clamp_min(1) if self.count > 1 else self.m2 * math.nan

    @property
    def var_population(self) -> Tensor:
        return self.m2 / self.count.clamp_min(1)


def chan_merge(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s parallel update: the moments of the union of two disjoint sets."""
    n = a.count + b.count
    if float(n) == 0:
        return a
    delta = b.mean - a.mean
    frac_b = b.count / n
    mean = a.mean + delta * frac_b
    m2 = a.m2 + b.m2 + delta.square() * a.count * frac_b
    return Moments(n, mean, m2)


@dataclass
class LayerStats:
    """What the exact pass knows about one BN layer's input.

    ``data``: moments of the input over the probe (per channel, over batch and spatial).
    ``batch_mean`` / ``batch_var``: moments, over sub-batches of the training batch size, of
    each sub-batch's mean and unbiased variance: the spread the EMA averages.
    """

    data: Moments
    batch_mean: Moments
    batch_var: Moments

    def merged(self, other: LayerStats) -> LayerStats:
        return LayerStats(
            chan_merge(self.data, other.data),
            chan_merge(self.batch_mean, other.batch_mean),
            chan_merge(self.batch_var, other.batch_var),
        )


def merge_across_ranks(stats: dict[str, LayerStats]) -> dict[str, LayerStats]:
    """Merge every rank's share with ``all_gather``; the identity in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    out: dict[str, LayerStats] = {}
    for name, s in stats.items():
        parts = [m for mom in (s.data, s.batch_mean, s.batch_var) for m in mom]
        flat = torch.cat([p.reshape(-1) for p in parts])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        merged: LayerStats | None = None
        for g in gathered:
            pieces = list(g.split([p.numel() for p in parts]))
            moms = [Moments(pieces[i].reshape(()), pieces[i + 1], pieces[i + 2]) for i in (0, 3, 6)]
            one = LayerStats(*moms)
            merged = one if merged is None else merged.merged(one)
        assert merged is not None
        out[name] = merged
    return out


def bn_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """Every BatchNorm layer that keeps running statistics, by qualified name."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    }


class _StopForward(Exception):
    """Raised by the last hook needed: nothing downstream of it matters to the pass."""


def _channel_dims(x: Tensor) -> tuple[int, ...]:
    return (0, *range(2, x.dim()))


def _sub_batch_moments(xs: Tensor, dims: tuple[int, ...], per: int) -> tuple[Tensor, Tensor]:
    """Per sub-batch and channel: mean and M2 (float64), from ``xs`` of shape (k, b, C, ...).

    With spatial dims ``var_mean`` is fastest (on CPU it accumulates float32 in double). For
    (k, b, C) it reduces a middle dim about 10x slower than a two-pass sum, so 1d layers use
    the two-pass form: a float64 mean, then squared deviations summed in float64.
    """
    if xs.dim() > 3:
        var, mean = torch.var_mean(xs, dim=dims, correction=0)
        return mean.double(), var.double() * per
    mean = xs.mean(dim=dims, keepdim=True, dtype=torch.float64)
    center = mean.to(xs.dtype)
    m2 = (xs - center).square().sum(dim=dims, dtype=torch.float64)
    m2 = m2 - per * (mean - center.double()).square().squeeze(1)  # exact shift correction
    return mean.squeeze(1), m2


def _reduce(x: Tensor, b: int) -> LayerStats:
    """One chunk's statistics; sub-batches of ``b`` samples give the per-batch spread."""
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # bf16 activations under autocast
    n, channels = x.shape[0], x.shape[1]
    k = n // b
    batch_mean = Moments.empty(channels, x.device)
    batch_var = Moments.empty(channels, x.device)
    data = Moments.empty(channels, x.device)
    if k > 0:
        xs = x[: k * b].reshape(k, b, *x.shape[1:])
        per = x[0, 0].numel() * b  # values per sub-batch and channel
        means, m2s = _sub_batch_moments(xs, (1, *range(3, xs.dim())), per)  # (k, C)
        # Equal-count sub-batches merge in closed form (Chan's formula, k groups at once).
        grand = means.mean(0)
        m2 = m2s.sum(0) + per * (means - grand).square().sum(0)
        data = Moments(
            torch.tensor(float(k * per), dtype=torch.float64, device=x.device), grand, m2
        )
        batch_mean = Moments.of(means, 0)
        uvar = m2s / (per - 1) if per > 1 else m2s * math.nan
        batch_var = Moments.of(uvar, 0)
    if k * b < n:
        data = chan_merge(data, Moments.of(x[k * b :], _channel_dims(x)))
    return LayerStats(data, batch_mean, batch_var)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _chunks(x: Tensor, index: Tensor, size: int) -> Iterator[Tensor]:
    for start in range(0, len(index), size):
        yield x[index[start : start + size]]


@torch.inference_mode()
def exact_stats(
    model: nn.Module,
    x: Tensor,
    index: Tensor | None = None,
    batch_size: int = 32,
    chunk_size: int = 1024,
    precision: str = "fp32",
    layers: list[str] | None = None,
    order: list[str] | None = None,
) -> dict[str, LayerStats]:
    """Exact input statistics of BN layers over ``x[index]``, upstream layers in eval mode.

    ``batch_size`` is the training micro-batch size (for the per-batch spread); the pass runs
    in chunks of a multiple of it. ``layers`` restricts the pass to some layers, and it stops
    the forward after the last of them has fired. If ``order`` is given (a list) it is filled
    with the layers' names in the order they fired, i.e. upstream first. The result is
    merged across ranks (each rank passes its own share of the data).
    """
    model = getattr(model, "module", model)  # DDP: run the inner module, no collectives
    all_bn = bn_layers(model)
    wanted = list(all_bn) if layers is None else list(layers)
    if index is None:
        index = torch.arange(len(x), device=x.device)
    b = max(1, int(batch_size))
    size = max(1, chunk_size // b) * b
    acc: dict[str, LayerStats] = {}
    seen: list[str] = []

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            s = _reduce(inputs[0], b)
            acc[name] = acc[name].merged(s) if name in acc else s
            if name not in seen:
                seen.append(name)
            if len(seen) == len(wanted) and name == seen[-1]:
                raise _StopForward

        return hook

    handles = [all_bn[n].register_forward_pre_hook(hook_for(n)) for n in wanted]
    was_training = model.training
    model.eval()
    try:
        for xb in _chunks(x, index.to(x.device), size):
            seen_before = len(seen)
            try:
                with _autocast(xb.device, precision):
                    model(xb)
            except _StopForward:
                pass
            if seen_before == 0 and order is not None:
                order[:] = list(seen)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in wanted if n not in acc]
    for n in missing:  # a layer the forward never reached (or an empty probe)
        c = all_bn[n].num_features
        acc[n] = LayerStats(
            Moments.empty(c, x.device), Moments.empty(c, x.device), Moments.empty(c, x.device)
        )
    return merge_across_ranks({n: acc[n] for n in wanted})


# ----------------------------------------------------------------------------- EMA theory


def init_weight(momentum: float | None, t: int) -> float:
    """Weight the running value still puts on its initial value after ``t`` updates."""
    if momentum is None:  # cumulative average: the first update replaces the initial value
        return 1.0 if t == 0 else 0.0
    return (1.0 - momentum) ** t


def noise_factor(momentum: float | None, t: int) -> float:
    """Var(EMA) / Var(one batch's statistic) for a stationary input after ``t`` updates.

    ``sum_k w_k^2`` over the batch weights: ``m / (2 - m) * (1 - (1 - m)^(2t))`` for an EMA
    (-> ``m / (2 - m)`` for large t), ``1 / t`` for the cumulative average.
    """
    if t <= 0:
        return 0.0
    if momentum is None:
        return 1.0 / t
    m = momentum
    return m / (2.0 - m) * (1.0 - (1.0 - m) ** (2 * t))


def folded_mean(mu: Tensor, sd: Tensor) -> Tensor:
    """E|X| for X ~ N(mu, sd^2): the expected size of a gap with bias mu and noise sd."""
    mu, sd = mu.double(), sd.double()
    safe = sd.clamp_min(1e-300)
    val = sd * math.sqrt(2 / math.pi) * torch.exp(-(mu**2) / (2 * safe**2)) + mu * torch.erf(
        mu / (safe * math.sqrt(2))
    )
    return torch.where(sd > 0, val, mu.abs())


# ----------------------------------------------------------------------------- gap metrics

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


def layer_gaps(layer: _BatchNorm, stats: LayerStats) -> dict[str, float]:
    """Measured gap between ``layer``'s running statistics and ``stats``, and the theory's."""
    mean, var = stats.data.mean, stats.data.var
    std = var.clamp_min(1e-30).sqrt()
    rm = layer.running_mean.detach().double().to(mean.device)
    rv = layer.running_var.detach().double().to(mean.device)
    gap = (rm - mean).abs() / std
    lvr = torch.log(rv.clamp_min(1e-30) / var.clamp_min(1e-30))
    t = int(layer.num_batches_tracked) if layer.num_batches_tracked is not None else 0
    m = layer.momentum
    w0, f2 = init_weight(m, t), noise_factor(m, t)

    # Mean: E[running] = w0 * 0 + (1 - w0) * E[batch mean]; noise = sqrt(f2) * sd(batch mean).
    sd_bm = stats.batch_mean.var.sqrt() if stats.batch_mean.count > 1 else mean * math.nan
    bias = (w0 * INIT_MEAN + (1 - w0) * stats.batch_mean.mean - mean) / std
    noise = math.sqrt(f2) * sd_bm / std
    pred_gap = folded_mean(bias, noise)
    # Variance: E[running] = w0 * 1 + (1 - w0) * E[batch var]; the log by the delta method.
    expect_rv = w0 * INIT_VAR + (1 - w0) * stats.batch_var.mean
    sd_bv = stats.batch_var.var.sqrt() if stats.batch_var.count > 1 else var * math.nan
    lv_center = torch.log(expect_rv.clamp_min(1e-30) / var.clamp_min(1e-30))
    lv_noise = math.sqrt(f2) * sd_bv / expect_rv.clamp_min(1e-30)
    pred_lv = folded_mean(lv_center, lv_noise)

    def f(v: Tensor) -> float:
        return float(v)

    out = {
        "mean_gap_mean": f(gap.mean()),
        "mean_gap_max": f(gap.max()),
        "logvar_ratio_mean": f(lvr.abs().mean()),
        "logvar_ratio_max": f(lvr.abs().max()),
        "logvar_ratio_signed": f(lvr.mean()),
        "num_batches_tracked": t,
        "pred_mean_gap_mean": f(pred_gap.mean()),
        "pred_mean_gap_noise": f((noise * math.sqrt(2 / math.pi)).mean()),
        "pred_mean_gap_bias": f(bias.abs().mean()),
        "pred_logvar_ratio_mean": f(pred_lv.mean()),
        "pred_init_weight": w0,
    }
    p = out["pred_mean_gap_mean"]
    out["gap_vs_pred"] = out["mean_gap_mean"] / p if p > 0 else math.nan
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


def gap_metrics(model: nn.Module, stats: dict[str, LayerStats]) -> dict[str, dict[str, float]]:
    layers = bn_layers(getattr(model, "module", model))
    return {n: layer_gaps(layers[n], s) for n, s in stats.items()}


def flatten(per_layer: dict[str, dict[str, float]]) -> dict[str, Any]:
    """``bn/<layer>/<metric>`` keys plus the aggregates, for a metrics row."""
    row: dict[str, Any] = {}
    for name, vals in per_layer.items():
        row.update({f"bn/{name}/{k}": v for k, v in vals.items()})
    row.update(aggregate(per_layer))
    return row


# ----------------------------------------------------------------------------- PreciseBN


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    x: Tensor,
    index: Tensor | None = None,
    batch_size: int = 32,
    chunk_size: int = 1024,
    precision: str = "fp32",
) -> dict[str, LayerStats]:
    """Replace every BN layer's running statistics by the exact ones, upstream first.

    Each layer's statistics depend on the (eval-mode) layers above it, so layer k is measured
    only after layers 1..k-1 were replaced: one pass per layer, each stopped at its layer.
    """
    inner = getattr(model, "module", model)
    layers = bn_layers(inner)
    order: list[str] = []
    exact_stats(inner, x, index, batch_size, chunk_size, precision, order=order)
    order += [n for n in layers if n not in order]  # layers the forward never reached
    out: dict[str, LayerStats] = {}
    for name in order:
        s = exact_stats(inner, x, index, batch_size, chunk_size, precision, layers=[name])[name]
        if s.data.count > 1:
            layers[name].running_mean.copy_(s.data.mean.to(layers[name].running_mean))
            layers[name].running_var.copy_(s.data.var.to(layers[name].running_var))
        out[name] = s
    return out


# ----------------------------------------------------------------------------- the monitor


class Monitor:
    """The training loop's hook: measures the gaps every ``every_n_steps`` optimizer steps.

    Call it with the optimizer step (``LoopConfig.hooks``); it returns ``bn/...`` metrics at
    its cadence and at ``total_steps``, else None. The probe is drawn once with its own
    ``torch.Generator``, so training's random streams are untouched; the pass runs in eval
    mode under ``inference_mode`` and restores the mode it found.
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        *,
        batch_size: int,
        total_steps: int,
        every_n_steps: int | None = None,
        probe_samples: int | None = None,
        seed: int = 0,
        chunk_size: int = 1024,
        precision: str = "fp32",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.model, self.x, self.batch_size = model, x, batch_size
        self.total_steps = total_steps
        self.every = every_n_steps or max(1, total_steps // 20)
        self.chunk_size, self.precision = chunk_size, precision
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(x), generator=g)  # shuffled: sub-batches are random batches
        if probe_samples is not None:
            perm = perm[: min(probe_samples, len(x))]
        self.index = perm[rank::world_size].to(x.device)
        self.seconds = 0.0
        self.last: dict[str, dict[str, float]] = {}
        self.last_step: int | None = None

    @property
    def active(self) -> bool:
        return bool(bn_layers(getattr(self.model, "module", self.model)))

    def measure(self) -> dict[str, dict[str, float]]:
        t0 = time.perf_counter()
        stats = exact_stats(
            self.model, self.x, self.index, self.batch_size, self.chunk_size, self.precision
        )
        per_layer = gap_metrics(self.model, stats)
        self.seconds += time.perf_counter() - t0
        return per_layer

    def __call__(self, step: int) -> dict[str, Any] | None:
        if not self.active or (step % self.every != 0 and step != self.total_steps):
            return None
        self.last, self.last_step = self.measure(), step
        return flatten(self.last)

    def finish(
        self,
        micro_batches: int,
        optimizer_steps: int,
        recalibrate_stats: bool = False,
        evaluate: Callable[[], float] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The end of training: ``(row, summary_part)``.

        ``summary_part`` has ``bn`` (final values per layer), ``final`` (aggregates),
        ``bn_updates_equal_micro_batches`` and ``bn_updates``. With ``recalibrate_stats``
        the running statistics are replaced by the exact ones (PreciseBN) and ``evaluate``
        (the test accuracy) runs before and after; ``row`` holds what to log.
        """
        if not self.active:
            return {}, {}
        if self.last_step != optimizer_steps:
            self.last, self.last_step = self.measure(), optimizer_steps
        per_layer = {n: dict(v) for n, v in self.last.items()}
        tracked = {n: int(v["num_batches_tracked"]) for n, v in per_layer.items()}
        equal = all(t == micro_batches for t in tracked.values())
        final = aggregate(per_layer)
        row: dict[str, Any] = {}
        if recalibrate_stats:
            t0 = time.perf_counter()
            before = evaluate() if evaluate is not None else math.nan
            recalibrate(
                self.model, self.x, self.index, self.batch_size, self.chunk_size, self.precision
            )
            self.seconds += time.perf_counter() - t0
            after_layers = self.measure()
            after = evaluate() if evaluate is not None else math.nan
            for n, v in after_layers.items():
                per_layer[n]["after_recal"] = {k: v[k] for k in GAP_KEYS[:5]}
            row = {
                "bn/test_acc_before_recal": before,
                "bn/test_acc_after_recal": after,
                "bn/test_acc_recal_delta": after - before,
                **aggregate(after_layers, "_after_recal", with_theory=False),
            }
            final.update(row)
        part = {
            "bn": per_layer,
            "final": final,
            "bn_updates_equal_micro_batches": equal,
            "bn_updates": {
                "num_batches_tracked": tracked,
                "micro_batches": micro_batches,
                "optimizer_steps": optimizer_steps,
                "note": BN_UPDATES_NOTE,
            },
        }
        return row, part
