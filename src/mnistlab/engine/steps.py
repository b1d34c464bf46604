"""Step accounting: what one epoch, one iteration and one optimizer step really are.

``StepPlan`` is pure integer arithmetic from (N, epochs, batch size, world size, gradient
accumulation, drop_last), following ``torch.utils.data.DistributedSampler``: each rank gets
``ceil(N / world)`` indices (the tail padded by repeating the head), or ``floor(N / world)``
with ``drop_last``. A rank then cuts its shard into micro-batches (the last one shorter, or
dropped with ``drop_last``) and groups ``grad_accum`` of them into one optimizer step (the
last, shorter window of an epoch still steps). The loop ticks a :class:`StepCounter`; at the
end the two must agree. :class:`Cadence` says which of those steps log a row, a W&B row and
a BatchNorm measurement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from mnistlab.core.errors import ConfigError

# A training row has a fixed cost (weight norms, a JSON line, a device read: a host sync on a
# GPU), about 0.25 ms on a 2-core CPU: rows come about 50 a run but at least this many steps
# apart, so a short run (one MNIST epoch at batch 512 is 118 steps) does not pay it every
# second step.
MIN_ROW_STEPS = 10


@dataclass(frozen=True)
class StepPlan:
    num_samples: int
    epochs: int
    batch_size: int
    world_size: int
    grad_accum: int
    drop_last: bool

    @classmethod
    def from_config(
        cls, trainer: Any, num_samples: int, world_size: int, smallest_batch: int = 1
    ) -> StepPlan:
        """The plan of ``trainer`` (the config node) over ``num_samples`` training samples.
        Refused with one line if an epoch would hold no micro-batch, or a micro-batch fewer
        than ``smallest_batch`` samples (2 for a model with BatchNorm)."""
        t = trainer
        plan = cls(num_samples, t.epochs, t.batch_size, world_size, t.grad_accum, t.drop_last)
        need = max(1, smallest_batch)
        if plan.samples_per_rank < need:  # no batch size can help: too many ranks
            # the most ranks whose shards still hold ``need``: floor(N/w) or ceil(N/w) >= need
            most = (
                num_samples // need if t.drop_last or need == 1 else (num_samples - 1) // (need - 1)
            )
            allowed = f"at most {most} processes in all (trainer.devices x "
            allowed += f"trainer.num_nodes): {num_samples} training samples give each of "
            allowed += f"{world_size} ranks {plan.samples_per_rank}, a micro-batch needs {need}"
            raise ConfigError("trainer.devices", t.devices, allowed)
        if plan.micro_batches_per_epoch == 0:
            raise ConfigError(
                "trainer.batch_size",
                t.batch_size,
                f"at most {plan.samples_per_rank} (one rank's shard) with trainer.drop_last=true",
            )
        if plan.smallest_micro_batch < smallest_batch:
            raise ConfigError(
                "trainer.batch_size", t.batch_size, plan.short_batch_advice(smallest_batch)
            )
        return plan

    @property
    def smallest_micro_batch(self) -> int:
        """The fewest samples any rank's training micro-batch holds (shards are equal)."""
        return min(self.batch_size, self.last_micro_batch_size)

    def short_batch_advice(self, smallest: int) -> str:
        """Why a micro-batch is too small for the model, and batch sizes near this one that
        work (every micro-batch, the epoch's last included, holds at least ``smallest``)."""
        n, b = self.samples_per_rank, self.batch_size
        need = f"BatchNorm needs at least {smallest} samples per micro-batch in training"
        if b < smallest:
            return f"{need}; use trainer.batch_size >= {smallest}"
        near = [c for c in range(smallest, b + 9) if c != b and (n % c == 0 or n % c >= smallest)]
        near.sort(key=lambda c: (abs(c - b), c))
        return (
            f"each epoch's last micro-batch would hold {self.last_micro_batch_size} "
            f"({n} samples per rank = {b} x {n // b} + {n % b}) and {need}; use e.g. "
            f"trainer.batch_size={' or '.join(map(str, near[:2]))}, or trainer.drop_last=true"
        )

    @property
    def samples_per_rank(self) -> int:
        """Indices one rank draws per epoch (DistributedSampler's ``num_samples``)."""
        if self.drop_last:
            return self.num_samples // self.world_size
        return math.ceil(self.num_samples / self.world_size)

    @property
    def padding(self) -> int:
        """Repeated samples added per epoch so every rank gets an equal shard."""
        return max(0, self.samples_per_rank * self.world_size - self.num_samples)

    @property
    def dropped_by_sampler(self) -> int:
        return max(0, self.num_samples - self.samples_per_rank * self.world_size)

    @property
    def micro_batches_per_epoch(self) -> int:
        """Iterations per epoch on each rank: one forward/backward of a micro-batch."""
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return math.ceil(self.samples_per_rank / self.batch_size)

    @property
    def last_micro_batch_size(self) -> int:
        rem = self.samples_per_rank % self.batch_size
        return self.batch_size if rem == 0 or self.drop_last else rem

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer updates per epoch: one per accumulation window, the last one shorter."""
        return math.ceil(self.micro_batches_per_epoch / self.grad_accum)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def total_micro_batches(self) -> int:
        return self.micro_batches_per_epoch * self.epochs

    @property
    def bn_updates(self) -> int:
        """BatchNorm running-stat updates per rank: one per forward micro-batch, not per step."""
        return self.total_micro_batches

    @property
    def samples_per_rank_per_epoch_used(self) -> int:
        """Samples one rank feeds forward per epoch (after dropping a short last batch)."""
        if self.drop_last:
            return self.micro_batches_per_epoch * self.batch_size
        return self.samples_per_rank

    @property
    def samples_seen(self) -> int:
        """Samples fed forward over the run by all ranks together, padding included."""
        return self.samples_per_rank_per_epoch_used * self.world_size * self.epochs

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.world_size * self.grad_accum

    @property
    def textbook_steps(self) -> float:
        """``N x epochs / (world x batch x accum)``: the formula, before any rounding."""
        return self.num_samples * self.epochs / self.effective_batch_size

    def window_sizes(self) -> list[int]:
        """Micro-batches in each accumulation window of one epoch (the last may be shorter)."""
        n, a = self.micro_batches_per_epoch, self.grad_accum
        return [min(a, n - start) for start in range(0, n, a)]

    def as_dict(self) -> dict[str, float | int | bool]:
        """Inputs and every derived number, for ``summary.json`` and the W&B config."""
        out: dict[str, float | int | bool] = dict(asdict(self))
        for name in (
            "samples_per_rank",
            "padding",
            "dropped_by_sampler",
            "micro_batches_per_epoch",
            "last_micro_batch_size",
            "steps_per_epoch",
            "total_micro_batches",
            "total_steps",
            "bn_updates",
            "samples_seen",
            "effective_batch_size",
            "textbook_steps",
        ):
            out[name] = getattr(self, name)
        return out

    def banner(self, nodes: int = 1) -> str:
        """The run's accounting in the familiar "***** Running training *****" shape."""
        devices = self.world_size // max(1, nodes)
        rows = [
            ("Num examples (N)", self.num_samples),
            ("Num epochs", self.epochs),
            ("Batch size per device", self.batch_size),
            ("World size (devices)", f"{self.world_size} ({nodes} node(s) x {devices} device(s))"),
            ("Gradient accumulation steps", self.grad_accum),
            ("Effective batch size", self.effective_batch_size),
            ("drop_last", self.drop_last),
            (
                "Samples per rank per epoch",
                f"{self.samples_per_rank} "
                f"(padding {self.padding}, dropped {self.dropped_by_sampler})",
            ),
            ("Iterations (micro-batches) per epoch", self.micro_batches_per_epoch),
            ("Optimizer steps per epoch", self.steps_per_epoch),
            ("Total optimizer steps", self.total_steps),
            ("Textbook N*epochs/(world*batch*accum)", f"{self.textbook_steps:g}"),
            ("BN running-stat updates per rank", self.bn_updates),
            ("Samples seen (all ranks)", self.samples_seen),
        ]
        width = max(len(k) for k, _ in rows)
        lines = ["***** Running training *****"]
        lines += [f"  {k:<{width}} = {v}" for k, v in rows]
        return "\n".join(lines)


@dataclass
class StepCounter:
    """What the loop really did; compared with the plan at the end."""

    micro_batches: int = 0
    optimizer_steps: int = 0
    samples_seen: int = 0
    epochs: int = 0

    def counted(self) -> dict[str, int]:
        """The counts under the plan's names, as ``summary.json["counted"]`` holds them."""
        return {
            "total_micro_batches": self.micro_batches,
            "total_steps": self.optimizer_steps,
            "samples_seen": self.samples_seen,
            "epochs": self.epochs,
        }

    def compare(self, plan: StepPlan) -> dict[str, tuple[int, int]]:
        """Counted vs planned for every quantity that differs (empty when all match)."""
        planned = {
            "total_micro_batches": plan.total_micro_batches,
            "total_steps": plan.total_steps,
            "samples_seen": plan.samples_seen,
            "epochs": plan.epochs,
        }
        pairs = {k: (v, planned[k]) for k, v in self.counted().items()}
        return {k: v for k, v in pairs.items() if v[0] != v[1]}


@dataclass(frozen=True)
class Cadence:
    """Which optimizer steps log what: one answer for the rows, W&B and the BN points.

    Every cadence also fires at the last step, except W&B's grid, which gets the last step
    through its BN point.
    """

    total_steps: int
    row_every: int  # a training row (loss, accuracy, weight metrics) every k steps
    wandb_every: int  # W&B takes the rows of every k-th step (a multiple of row_every)
    bn_every: int | None  # a BatchNorm measurement every k steps; None: the model has no BN

    @classmethod
    def of(
        cls,
        total_steps: int,
        rows: int | None = None,
        wandb: int | None = None,
        bn: int | None = None,
        has_bn: bool = True,
    ) -> Cadence:
        """The defaults: rows about 50 a run but at least ``MIN_ROW_STEPS`` apart; W&B about
        ten training rows a run (every row of a short run), each on a step that has a row;
        about 20 BN points. An explicit interval wins."""
        row_every = rows or max(MIN_ROW_STEPS, total_steps // 50)
        wandb_every = wandb or row_every * max(1, total_steps // row_every // 10)
        bn_every = (bn or max(1, total_steps // 20)) if has_bn else None
        return cls(total_steps, row_every, wandb_every, bn_every)

    def row(self, step: int) -> bool:
        return step % self.row_every == 0 or step == self.total_steps

    def bn_point(self, step: int) -> bool:
        if self.bn_every is None:
            return False
        return step % self.bn_every == 0 or step == self.total_steps

    def wandb_row(self, step: int) -> bool:
        """Whether W&B takes this step's row: its grid, and every BN point."""
        return step % self.wandb_every == 0 or self.bn_point(step)
