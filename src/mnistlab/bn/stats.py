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


class _Accumulator:
    """One layer's share of the pass: every sample's per-channel moments (its mean and M2
    over spatial positions), kept until :meth:`result`.

    Per chunk the hook costs one mean and one squared-deviation sum over each sample's own
    values (nothing for a 1d layer, whose sample is its own mean); the sub-batches of the
    training batch size are formed afterwards from these rows, in any order
    (:meth:`result`'s ``order``), so the pass itself can run over plain views of the data.
    """

    def __init__(self, b: int) -> None:
        self.b = b
        self.means: list[Tensor] = []  # (n, C) per chunk, in the activations' precision
        self.m2s: list[Tensor] = []  # (n, C) per chunk; empty for a 1d layer
        self.per = 1  # values per sample and channel: the spatial positions

    def add(self, x: Tensor) -> None:
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # bf16 activations under autocast
        if x.dim() == 2:
            self.means.append(x)  # the hook's input is not changed in place downstream
            return
        spatial = tuple(range(2, x.dim()))
        self.per = x[0, 0].numel()
        mean = x.mean(dim=spatial, keepdim=True)
        # One sample's positions are few: a two-pass sum in the input's precision is exact
        # enough; everything across samples is merged in float64 in result().
        self.m2s.append((x - mean).square_().sum(dim=spatial))
        self.means.append(mean.reshape(x.shape[:2]))

    def result(self, channels: int, device: torch.device, order: Tensor | None) -> LayerStats:
        """The layer's statistics; sub-batches of ``b`` consecutive samples in ``order`` (a
        permutation of the samples fed; None: the order they were fed), the tail short of a
        whole sub-batch in the data's moments only."""
        empty = Moments.empty(channels, device)
        if not self.means:
            return LayerStats(empty, empty, Moments.empty(channels, device))
        means = torch.cat(self.means).double()  # (N, C)
        m2s = torch.cat(self.m2s).double() if self.m2s else None
        n, per, b = means.shape[0], self.per, self.b

        def f64(v: float) -> Tensor:
            return torch.tensor(v, dtype=torch.float64, device=device)

        grand = means.mean(0)
        m2 = (means - grand).square_().sum(0).mul_(per)  # between samples
        if m2s is not None:
            m2 += m2s.sum(0)  # within samples
        data = Moments(f64(float(n * per)), grand, m2)
        k = n // b
        if k == 0:
            return LayerStats(data, empty, Moments.empty(channels, device))
        if order is not None:
            idx = order[: k * b].to(means.device)
            means = means.index_select(0, idx)
            m2s = m2s.index_select(0, idx) if m2s is not None else None
        else:
            means, m2s = means[: k * b], m2s[: k * b] if m2s is not None else None
        mb = means.view(k, b, channels)
        sub_mean = mb.mean(1)  # (k, C)
        sub_m2 = (mb - sub_mean.unsqueeze(1)).square_().sum(1).mul_(per)
        if m2s is not None:
            sub_m2 += m2s.view(k, b, channels).sum(1)
        count = b * per
        sub_var = sub_m2 / (count - 1) if count > 1 else torch.full_like(sub_m2, math.nan)

        def spread(v: Tensor) -> Moments:  # moments of k values per channel
            mu = v.mean(0)
            return Moments(f64(float(k)), mu, (v - mu).square_().sum(0))

        return LayerStats(data, spread(sub_mean), spread(sub_var))


class Accumulators:
    """Exact input statistics of some BN layers, fed chunk by chunk (:meth:`add`): what
    :func:`exact_stats` accumulates from its hooks, and what a stacked group's pass feeds
    for each of its copies (:mod:`mnistlab.sweeps.lockstep`)."""

    def __init__(self, layers: dict[str, int], batch_size: int) -> None:
        self.channels = layers  # name -> channels
        self.acc = {n: _Accumulator(max(1, int(batch_size))) for n in layers}

    def add(self, name: str, x: Tensor) -> None:
        self.acc[name].add(x)

    def result(self, device: torch.device, order: Tensor | None = None) -> dict[str, LayerStats]:
        """Merged across ranks; a layer never fed (an empty probe) gets count 0. ``order``:
        the sub-batches' order of the samples fed (see :meth:`_Accumulator.result`)."""
        return merge_across_ranks(
            {n: a.result(self.channels[n], device, order) for n, a in self.acc.items()}
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
    sub_batch_order: Tensor | None = None,
) -> dict[str, LayerStats]:
    """Exact input statistics of BN layers over ``x[index]``, upstream layers in eval mode.

    ``sub_batch_order`` (a permutation of the samples passed) makes the per-batch spread
    that of random batches while the pass runs over plain views of ``x`` (no gather).

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
    return acc.result(x.device, sub_batch_order)
