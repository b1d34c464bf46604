"""The training loop's BN callback (:class:`Monitor`): at the cadence's BN points it measures
every BN layer's exact input statistics over the whole training set (by default; a seeded
subset only where asked or where the budget forces one, its own noise reported), and returns
the gaps and the theory's prediction as ``bn/...`` metrics of the row.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mnistlab.bn.gaps import GAP_KEYS, aggregate, flatten, gap_metrics
from mnistlab.bn.precise import recalibrate
from mnistlab.bn.stats import LayerStats, exact_stats
from mnistlab.bn.theory import noise_factor
from mnistlab.engine.loop import Callback
from mnistlab.engine.models import TRAIN_FACTOR, bn_layers, forward_flops, unwrap
from mnistlab.engine.steps import Cadence

# The BN points may take at most BUDGET of the training time. With probe_samples=None every
# point measures the whole training set when the cost estimate below affords it; else the
# mid-run points measure the largest seeded subset it affords, but never one whose own
# sampling noise exceeds NOISE_SHARE of the EMA noise the theory predicts; else (default
# cadence) fewer mid-run points, each over the whole set.
BUDGET = 0.10
NOISE_SHARE = 0.10
# Subset probes up to this many samples are gathered once and kept (no gather per point).
CACHED_PROBE = 20_000


@dataclass(frozen=True)
class Costs:
    """The cost estimate's constants, in FLOP-equivalents: what one call (a training
    micro-batch, a chunk of the pass) costs beside its FLOPs, what one BN point costs beside
    its pass (merging, gap metrics), and how much more a pass's FLOP costs than a training
    one (eval forward in large chunks plus the hooks' statistics).
    Deterministic (the same run measures the same points whatever the machine's load);
    calibrated on a 2-core CPU so that the bench's share rows stay under the budget."""

    call: float
    point: float
    eval: float


COSTS = {
    "cpu": Costs(call=4e7, point=1.5e8, eval=3.0),
    "cuda": Costs(call=3e9, point=3e10, eval=1.0),
}
# PyTorch's initial running values; the theory's "initial bias" is relative to them.
INIT_MEAN, INIT_VAR = 0.0, 1.0
# Why the summary insists on it: the EMA advances once per forward micro-batch.
BN_UPDATES_NOTE = (
    "BatchNorm updates its running statistics once per forward micro-batch, not once per "
    "optimizer step: with gradient accumulation num_batches_tracked counts micro-batches"
)


class Monitor(Callback):
    """The training loop's callback: measures the gaps at the cadence's BN points.

    ``on_step`` returns ``bn/...`` metrics at those steps (the last step always), else None.
    A subset probe is drawn once with its own ``torch.Generator``, so training's random
    streams are untouched; the pass runs in eval mode under ``inference_mode`` and restores
    the mode it found. ``thin``: the cadence is the default one, which the budget may thin.
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
        thin: bool = False,
    ) -> None:
        self.model, self.x, self.batch_size = model, x, batch_size
        self.cadence = cadence  # its BN points: when to measure
        self.active = bool(bn_layers(model)) and cadence.bn_every is not None
        self.every = cadence.bn_every  # the mid-run points: every k steps (None: none)
        self.chunk_size, self.precision = chunk_size, precision
        self.world_size = world_size
        g = torch.Generator().manual_seed(seed)
        # Shuffled: the sub-batches are random batches, and subsets nested prefixes.
        self.perm = torch.randperm(len(x), generator=g)
        n_final = len(x) if probe_samples is None else min(probe_samples, len(x))
        n_periodic = n_final
        if self.active and probe_samples is None and train_samples:
            n_periodic, self.every = self._afford(train_samples, thin)
        self.sizes = {"periodic": n_periodic, "final": n_final}
        # Each rank takes its own share of the prefixes.
        self.index = {
            k: self.perm[:n][rank::world_size].to(x.device) for k, n in self.sizes.items()
        }
        self._gathered: dict[int, Tensor] = {}  # subset probes' inputs by size, gathered once
        self.seconds = 0.0
        self.offered: tuple[str, dict[str, LayerStats]] | None = None  # see offer()
        self.last: dict[str, dict[str, float]] = {}
        self.last_step: int | None = None

    # ------------------------------------------------------------------ what a point costs

    def _afford(self, train_samples: int, thin: bool) -> tuple[int, int | None]:
        """(mid-run probe size, mid-run interval) that the budget affords: the whole set at
        every default point if it can, else the largest subset no noisier than the floor
        (:meth:`noise_floor`), else (``thin``) fewer whole-set points."""
        c, n, every = self.cadence, len(self.x), self.cadence.bn_every
        assert every is not None
        k = (c.total_steps - 1) // every  # mid-run points
        if k == 0:
            return n, every
        costs = COSTS.get(self.x.device.type, COSTS["cpu"])
        f_bn, f_all = forward_flops(self.model, self.x[:2])
        w, b = self.world_size, self.batch_size
        train = train_samples / w * (costs.call / b + TRAIN_FACTOR * f_all)

        def cost(p: float) -> float:  # one pass over p samples (all ranks)
            calls = math.ceil(p / w / self.chunk_size)
            return costs.point + calls * costs.call + p / w * costs.eval * f_bn

        left = BUDGET * train - cost(n)  # what the mid-run points may spend
        if k * cost(n) <= left:
            return n, every
        floor = self.noise_floor(train_samples, k)
        fit = int(w * (left / k - costs.point - costs.call) / max(costs.eval * f_bn, 1e-30))
        if fit >= floor:
            return min(fit, n), every
        if not thin:  # an explicit cadence: its points, at the noise floor, over the budget
            return floor, every
        whole = int(left // cost(n))  # whole-set points affordable
        if whole <= 0:
            return n, None
        return n, every * math.ceil(k / whole)

    def noise_floor(self, train_samples: int, k: int) -> int:
        """The smallest probe whose own noise is at most NOISE_SHARE of the EMA noise the
        theory predicts at every mid-run point (its smallest, over the layers' momenta)."""
        n, b = len(self.x), self.batch_size
        updates = train_samples / (b * self.world_size)  # micro-batches (rank 0's)
        per_step = updates / self.cadence.total_steps
        every = self.cadence.bn_every or 1
        ts = [max(1, round(every * per_step)), max(1, round(k * every * per_step))]
        f2 = min(
            noise_factor(layer.momentum, t) for layer in bn_layers(self.model).values() for t in ts
        )
        if n < 2 or f2 <= 0:
            return n
        return min(n, math.ceil(b * n / (NOISE_SHARE * f2 * (n - 1) + b)))

    def probe_noise(self, probe: str) -> float:
        """Var(probe statistic) / Var(one batch's statistic): ``b / P * (N - P) / (N - 1)``.

        A probe of P of the N samples (drawn without replacement) estimates the whole set's
        mean with that much of one batch's variance; 0 when the probe is the whole set.
        """
        n, p = len(self.x), self.sizes[probe]
        if p >= n or n < 2:
            return 0.0
        return self.batch_size / p * (n - p) / (n - 1)

    def noise_share(self, probe: str) -> float:
        """The probe's own noise variance over the EMA noise variance the theory predicts
        now, the largest over the layers: 0 for the whole set."""
        extra = self.probe_noise(probe)
        if extra == 0.0:
            return 0.0
        shares = [
            extra / f2 if (f2 := noise_factor(m.momentum, int(m.num_batches_tracked))) else math.inf
            for m in bn_layers(unwrap(self.model)).values()
        ]
        return max(shares, default=0.0)

    def whole(self, probe: str) -> bool:
        """Whether probe ``probe`` is the whole training set (this rank's plain views)."""
        return self.sizes[probe] >= len(self.x) and self.world_size == 1

    def probe(self, probe: str) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """How to pass probe ``probe`` ("periodic" or "final"): ``(x, index, order)``, the
        samples ``x[index]`` (``x`` itself when index is None) and the sub-batches' order
        over them (None: as passed). The whole set is passed as views of the data with the
        seeded permutation as order; a subset up to CACHED_PROBE samples is gathered once."""
        if self.whole(probe):
            return self.x, None, self.perm
        index = self.index[probe]
        if len(index) > CACHED_PROBE:
            return self.x, index, None
        if len(index) not in self._gathered:  # equal sizes: the same prefix
            self._gathered[len(index)] = self.x.index_select(0, index)
        return self._gathered[len(index)], None, None

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
            x, index, order = self.probe(probe)
            stats = exact_stats(
                self.model, x, index, self.batch_size, self.chunk_size, self.precision,
                sub_batch_order=order,
            )  # fmt: skip
        per_layer = gap_metrics(self.model, stats, self.probe_noise(probe))
        self.seconds += time.perf_counter() - t0
        return per_layer

    def probe_at(self, step: int) -> str | None:
        """The probe a BN point at optimizer step ``step`` measures; None: not a point."""
        if not self.active:
            return None
        if step == self.cadence.total_steps:
            return "final"
        return "periodic" if self.every and step % self.every == 0 else None

    def on_step(self, step: int) -> dict[str, Any] | None:
        probe = self.probe_at(step)
        if probe is None:
            return None
        self.last = self.measure(probe)
        self.last_step = step if probe == "final" else None
        share = self.noise_share(probe)
        return flatten(self.last) | {
            "bn/probe_samples": self.sizes[probe],
            "bn/probe_noise_share": share,
        }

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
