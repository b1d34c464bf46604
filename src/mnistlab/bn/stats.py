"""The exact statistics of every BatchNorm layer's input: what the running values estimate.

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
(identity in a single process). Knows nothing of Hydra or W&B.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mnistlab.engine.models import autocast, bn_layers, unwrap

# PyTorch's initial running values; the theory's "initial bias" is relative to them.
INIT_MEAN, INIT_VAR = 0.0, 1.0


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
