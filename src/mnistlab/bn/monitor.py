"""The training loop's BN callback (:class:`Monitor`): at the cadence's BN points it measures
every BN layer's exact input statistics over a probe (the whole training set at the final
point), and returns the gaps and the theory's prediction as ``bn/...`` metrics of the row.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from mnistlab.bn.gaps import GAP_KEYS, aggregate, flatten, gap_metrics
from mnistlab.bn.precise import recalibrate
from mnistlab.bn.stats import LayerStats, exact_stats
from mnistlab.engine.loop import Callback
from mnistlab.engine.models import bn_layers
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
