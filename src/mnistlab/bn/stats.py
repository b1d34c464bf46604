"""BatchNorm running statistics: exact population statistics, gap metrics, EMA theory, PreciseBN.

A BatchNorm layer normalizes with batch statistics while training and keeps an exponential
moving average for inference, ``running = (1 - m) * running + m * batch_stat`` (PyTorch's
``momentum`` m is the weight of the new batch; ``None`` = cumulative average), starting at mean
0 / variance 1 and updated once per forward micro-batch. Those running values are estimates.
This module measures what they estimate: the mean and (unbiased) variance of every BN layer's
input over the training set (or a seeded probe subset), with the model in eval mode, i.e. with
every upstream layer as it behaves at test time.

The exact pass captures each BN input with a forward pre-hook, cuts every chunk into
sub-batches of the training batch size, reduces each sub-batch (a two-pass mean and M2; a tail
shorter than a sub-batch with ``var_mean`` in float64), and merges everything in float64 with
Chan's parallel formula, so the result equals one pass over all the data at once. Every
statistic is a :class:`Moments` triple ``(count, mean, M2)`` of float64 tensors;
:func:`chan_merge` combines two, and :func:`merge_across_ranks` combines the ranks' shares
(identity in a single process).

Beside the measurement sits the EMA theory: after t updates the initial value keeps weight
``(1 - m)^t``, and for a stationary input the EMA's noise variance is
``m / (2 - m) * (1 - (1 - m)^(2t))`` times the variance of one batch's statistic, which the
exact pass measures directly (sub-batches of the training batch size) instead of assuming
independent spatial positions. Knows nothing of Hydra or W&B.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from mnistlab.engine.loop import Callback
from mnistlab.engine.models import autocast, bn_layers, unwrap
from mnistlab.engine.steps import Cadence

# With ``probe_samples=None`` the periodic points measure a seeded subset of at most this many
# samples, and at most PROBE_SHARE of the samples trained between two points (at least
# MIN_PERIODIC_PROBE); the final point measures the whole training set. On MNIST a full pass
# is ~15% of an epoch's training, which 20 points per run can't afford.
PERIODIC_PROBE = 10_000
PROBE_SHARE = 0.25  # periodic probe size / samples trained between two points (all ranks)
MIN_PERIODIC_PROBE = 256
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
        return self.m2 / (self.count - 1).clamp_min(0)  # nan for fewer than 2 values (0/0)

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


class _StopForward(Exception):
    """Raised by the last hook needed: nothing downstream of it matters to the pass."""


def _channel_dims(x: Tensor) -> tuple[int, ...]:
    return (0, *range(2, x.dim()))


def _sub_batch_moments(xs: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Per sub-batch and channel: mean and M2, from ``xs`` of shape (k, b, C, ...).

    One sub-batch holds few values, so a two-pass sum in the input's precision is accurate
    (the many sub-batches are merged in float64 afterwards). On CPU it is 2-15x faster than
    ``var_mean``, whose Welford kernel is slow when the reduced dims are not innermost.
    """
    mean = xs.mean(dim=dims, keepdim=True)
    m2 = (xs - mean).square_().sum(dim=dims)
    return mean.reshape(m2.shape), m2


class _Accumulator:
    """One layer's running share of the pass: sub-batch moments, plus the short tail.

    Chunks are multiples of the batch size, so per chunk the hook costs a few tensor ops;
    everything else happens once per pass in :meth:`result`.
    """

    def __init__(self, b: int) -> None:
        self.b = b
        self.means: list[Tensor] = []  # (k, C) per chunk, in the activations' precision
        self.m2s: list[Tensor] = []
        self.per = 0  # values per sub-batch and channel: b x spatial positions
        self.rest: Moments | None = None  # samples that fill no whole sub-batch

    def add(self, x: Tensor) -> None:
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # bf16 activations under autocast
        n, b = x.shape[0], self.b
        k = n // b
        if k > 0:
            xs = x[: k * b].reshape(k, b, *x.shape[1:])
            self.per = x[0, 0].numel() * b
            means, m2s = _sub_batch_moments(xs, (1, *range(3, xs.dim())))
            self.means.append(means)
            self.m2s.append(m2s)
        if k * b < n:
            tail = Moments.of(x[k * b :], _channel_dims(x))
            self.rest = tail if self.rest is None else chan_merge(self.rest, tail)

    def result(self, channels: int, device: torch.device) -> LayerStats:
        data = Moments.empty(channels, device)
        batch_mean, batch_var = Moments.empty(channels, device), Moments.empty(channels, device)
        if self.means:
            # (2, k, C): the k sub-batches' means and M2s, in float64 from here on.
            both = torch.stack([torch.cat(self.means), torch.cat(self.m2s)]).double()
            k, per = both.shape[1], self.per
            avg = both.mean(1)  # grand mean; mean M2 per sub-batch
            ss = (both - avg.unsqueeze(1)).square_().sum(1)  # squared deviations over sub-batches
            count = torch.tensor([float(k * per), float(k)], dtype=torch.float64, device=device)
            # Equal-count sub-batches merge in closed form (Chan's formula, k groups at once);
            # the squared deviations of the sub-batch means are also their own M2.
            data = Moments(count[0], avg[0], k * avg[1] + per * ss[0])
            batch_mean = Moments(count[1], avg[0], ss[0])
            unbias = 1.0 / (per - 1) if per > 1 else math.nan  # sub-batch var = M2 / (per - 1)
            batch_var = Moments(count[1], avg[1] * unbias, ss[1] * unbias**2)
        if self.rest is not None:
            data = chan_merge(data, self.rest)
        return LayerStats(data, batch_mean, batch_var)


class Accumulators:
    """Exact input statistics of some BN layers, fed chunk by chunk (:meth:`add`): what
    :func:`exact_stats` accumulates from its hooks, and what a stacked group's pass feeds
    for each of its copies (:mod:`mnistlab.sweeps.lockstep`)."""

    def __init__(self, layers: dict[str, int], batch_size: int) -> None:
        self.channels = layers  # name -> channels
        self.acc = {n: _Accumulator(max(1, int(batch_size))) for n in layers}

    def add(self, name: str, x: Tensor) -> None:
        self.acc[name].add(x)

    def result(self, device: torch.device) -> dict[str, LayerStats]:
        """Merged across ranks; a layer never fed (an empty probe) gets count 0."""
        return merge_across_ranks(
            {n: a.result(self.channels[n], device) for n, a in self.acc.items()}
        )


def _chunks(x: Tensor, index: Tensor | None, size: int) -> Iterator[Tensor]:
    """``x[index]`` in chunks; without an index, views of ``x`` (no gather, no copy)."""
    for start in range(0, len(x) if index is None else len(index), size):
        yield (
            x[start : start + size]
            if index is None
            else x.index_select(0, index[start : start + size])
        )


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
    model = unwrap(model)
    all_bn = bn_layers(model)
    wanted = list(all_bn) if layers is None else list(layers)
    b = max(1, int(batch_size))
    size = max(1, chunk_size // b) * b
    acc = Accumulators({n: all_bn[n].num_features for n in wanted}, b)
    seen: list[str] = []

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            acc.add(name, inputs[0])
            if name not in seen:
                seen.append(name)
            if len(seen) == len(wanted) and name == seen[-1]:
                raise _StopForward

        return hook

    handles = [all_bn[n].register_forward_pre_hook(hook_for(n)) for n in wanted]
    was_training = model.training
    model.eval()
    # Eager even under trainer.compile (the compiled wrapper is unwrapped above, and the job
    # compiles a wrapper, not the module): traced, the hooks and accumulators would make
    # dynamo recompile at every point, up to its limit.
    try:
        for xb in _chunks(x, None if index is None else index.to(x.device), size):
            seen_before = len(seen)
            try:
                with autocast(xb.device, precision):
                    model(xb)
            except _StopForward:
                pass
            if seen_before == 0 and order is not None:
                order[:] = list(seen)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return acc.result(x.device)


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


def _folded_mean_np(mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """:func:`folded_mean` on numpy arrays (the erf borrowed from torch, zero-copy)."""
    safe = np.maximum(sd, 1e-300)
    erf = torch.from_numpy(mu / (safe * math.sqrt(2))).erf_().numpy()
    val = sd * math.sqrt(2 / math.pi) * np.exp(-(mu**2) / (2 * safe**2)) + mu * erf
    return np.where(sd > 0, val, np.abs(mu))


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


def _per_channel(
    cols: np.ndarray, eps: np.ndarray, w0: np.ndarray, f2: np.ndarray, probe_noise: float
) -> np.ndarray:
    """Per channel, from the 8 rows of :func:`gap_metrics`' columns: |gap|, |log ratio|, log
    ratio, and the theory's expected |gap| (bias and noise, noise, bias) and |log ratio|.

    In units of what BN itself divides by, sqrt(var + eps): a channel that L1 or a dead ReLU
    left constant (var 0) then reads as a gap of ~0, not as 1e4 standard deviations."""
    mean, var, bm_mean, bm_var, bv_mean, bv_var, rm, rv = cols
    var_c = var + eps
    std = np.sqrt(var_c)
    gap = np.abs(rm - mean) / std
    lvr = np.log((np.maximum(rv, 0.0) + eps) / var_c)
    # Mean: E[running] = w0 * 0 + (1 - w0) * E[batch mean]; noise from sd(batch mean).
    bias = (w0 * INIT_MEAN + (1 - w0) * bm_mean - mean) / std
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
            _folded_mean_np(bias, noise),
            noise * math.sqrt(2 / math.pi),
            np.abs(bias),
            _folded_mean_np(lv_center, lv_noise),
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
    inner = unwrap(model)
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


class Monitor(Callback):
    """The training loop's callback: measures the gaps at the cadence's BN points.

    ``on_step`` returns ``bn/...`` metrics at those steps (the last step always), else None.
    The probe is drawn once with its own ``torch.Generator``, so training's random streams
    are untouched; the pass runs in eval mode under ``inference_mode`` and restores the mode
    it found.
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        *,
        batch_size: int,
        cadence: Cadence,
        probe_samples: int | None = None,
        seed: int = 0,
        chunk_size: int = 4096,
        precision: str = "fp32",
        rank: int = 0,
        world_size: int = 1,
        train_samples: int | None = None,
    ) -> None:
        self.model, self.x, self.batch_size = model, x, batch_size
        self.cadence = cadence  # its BN points: when to measure
        self.active = bool(bn_layers(model)) and cadence.bn_every is not None
        self.chunk_size, self.precision = chunk_size, precision
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(x), generator=g)  # shuffled: sub-batches are random batches
        n_final = len(x) if probe_samples is None else min(probe_samples, len(x))
        n_periodic = min(n_final, PERIODIC_PROBE) if probe_samples is None else n_final
        if probe_samples is None and train_samples is not None and cadence.bn_every:
            # An eval forward costs about a third of a training step: a probe of a quarter of
            # the samples trained between two points keeps the pass near 10% of training.
            points = max(1, cadence.total_steps // cadence.bn_every)
            budget = int(PROBE_SHARE * train_samples / points) // world_size * world_size
            n_periodic = min(n_periodic, max(MIN_PERIODIC_PROBE, budget))
        self.sizes = {"periodic": n_periodic, "final": n_final}
        # Nested prefixes of one permutation; each rank takes its own share of them.
        self.index = {k: perm[:n][rank::world_size].to(x.device) for k, n in self.sizes.items()}
        # The periodic probe's inputs, gathered once (at most PERIODIC_PROBE samples when
        # probe_samples is null): a gather per point would cost as much as a BN layer's stats.
        small = n_periodic <= PERIODIC_PROBE
        self.periodic_x = x[self.index["periodic"]] if small else None
        self.seconds = 0.0
        self.offered: tuple[str, dict[str, LayerStats]] | None = None  # see offer()
        self.last: dict[str, dict[str, float]] = {}
        self.last_step: int | None = None

    def probe_noise(self, probe: str) -> float:
        """Var(probe statistic) / Var(one batch's statistic): ``b / P * (N - P) / (N - 1)``.

        A probe of P of the N samples (drawn without replacement) estimates the whole set's
        mean with that much of one batch's variance; 0 when the probe is the whole set.
        """
        n, p = len(self.x), self.sizes[probe]
        if p >= n or n < 2:
            return 0.0
        return self.batch_size / p * (n - p) / (n - 1)

    def probe(self, probe: str) -> tuple[Tensor, Tensor | None]:
        """The samples of probe ``probe`` ("periodic" or "final"): ``x[index]``, or ``x``
        itself when ``index`` is None."""
        if probe == "periodic" and self.periodic_x is not None:
            return self.periodic_x, None
        return self.x, self.index[probe]

    def offer(self, probe: str, stats: dict[str, LayerStats], seconds: float) -> None:
        """The statistics of ``probe`` as they stand now, measured elsewhere (a stacked
        group measures all its copies in one pass): the next :meth:`measure` of that probe
        takes them instead of its own pass."""
        self.offered = (probe, stats)
        self.seconds += seconds

    def measure(self, probe: str = "final") -> dict[str, dict[str, float]]:
        t0 = time.perf_counter()
        offered, self.offered = self.offered, None
        if offered is not None and offered[0] == probe:
            stats = offered[1]
        else:
            x, index = self.probe(probe)
            stats = exact_stats(
                self.model, x, index, self.batch_size, self.chunk_size, self.precision
            )
        per_layer = gap_metrics(self.model, stats, self.probe_noise(probe))
        self.seconds += time.perf_counter() - t0
        return per_layer

    def probe_at(self, step: int) -> str | None:
        """The probe a BN point at optimizer step ``step`` measures; None: not a point."""
        if not self.active or not self.cadence.bn_point(step):
            return None
        return "final" if step == self.cadence.total_steps else "periodic"

    def on_step(self, step: int) -> dict[str, Any] | None:
        probe = self.probe_at(step)
        if probe is None:
            return None
        self.last = self.measure(probe)
        self.last_step = step if probe == "final" else None
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
                self.model,
                self.x,
                self.index["final"],
                self.batch_size,
                self.chunk_size,
                self.precision,
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
