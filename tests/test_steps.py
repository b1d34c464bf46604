"""StepPlan against a brute-force simulation of DistributedSampler and the loop."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler

from mnistlab.engine.loop import epoch_order, micro_batches, windows
from mnistlab.engine.steps import StepCounter, StepPlan

from support import TorchThreads


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one torch thread each test (see ``support.TorchThreads``)."""
    with TorchThreads(1):
        yield


def sampler_order(plan: StepPlan, seed: int, epoch: int, rank: int) -> list[int]:
    """One rank's indices for one epoch, from the real DistributedSampler."""
    sampler = DistributedSampler(
        range(plan.num_samples),
        num_replicas=plan.world_size,
        rank=rank,
        shuffle=True,
        seed=seed,
        drop_last=plan.drop_last,
    )
    sampler.set_epoch(epoch)
    return list(sampler)


def simulate(plan: StepPlan, seed: int = 0) -> dict[str, int]:
    """Walk every rank through every epoch exactly as the loop does, counting by hand."""
    steps_per_rank, micro_per_rank, samples = [], [], 0
    for rank in range(plan.world_size):
        steps = micro = 0
        for epoch in range(plan.epochs):
            idx = sampler_order(plan, seed, epoch, rank)
            batches = [idx[i : i + plan.batch_size] for i in range(0, len(idx), plan.batch_size)]
            if plan.drop_last and batches and len(batches[-1]) < plan.batch_size:
                batches.pop()
            micro += len(batches)
            samples += sum(len(b) for b in batches)
            steps += -(-len(batches) // plan.grad_accum)
        steps_per_rank.append(steps)
        micro_per_rank.append(micro)
    assert len(set(steps_per_rank)) == 1, "every rank must take the same number of steps"
    return {"steps": steps_per_rank[0], "micro": micro_per_rank[0], "samples": samples}


plans = st.builds(
    StepPlan,
    num_samples=st.integers(1, 400),
    epochs=st.integers(1, 3),
    batch_size=st.integers(1, 64),
    world_size=st.integers(1, 8),
    grad_accum=st.integers(1, 6),
    drop_last=st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(plans)
def test_plan_matches_brute_force(plan: StepPlan) -> None:
    sim = simulate(plan)
    assert plan.total_steps == sim["steps"]
    assert plan.total_micro_batches == sim["micro"]
    assert plan.bn_updates == sim["micro"]
    assert plan.samples_seen == sim["samples"]
    assert sum(plan.window_sizes()) == plan.micro_batches_per_epoch
    assert len(plan.window_sizes()) == plan.steps_per_epoch


@settings(max_examples=150, deadline=None)
@given(plans, st.integers(0, 2**31), st.integers(0, 5), st.data())
def test_epoch_order_is_the_samplers_order(
    plan: StepPlan, seed: int, epoch: int, data: st.DataObject
) -> None:
    """The loop's tensor version yields exactly what DistributedSampler yields, padding (ranks
    beyond the samples included) and drop_last's cut alike."""
    rank = data.draw(st.integers(0, plan.world_size - 1))
    assert epoch_order(plan, seed, epoch, rank).tolist() == sampler_order(plan, seed, epoch, rank)


@settings(max_examples=60, deadline=None)
@given(plans)
def test_loop_helpers_cut_what_the_plan_says(plan: StepPlan) -> None:
    order = epoch_order(plan, seed=3, epoch=1, rank=plan.world_size - 1)
    assert len(order) == plan.samples_per_rank
    batches = micro_batches(order, plan)
    assert len(batches) == plan.micro_batches_per_epoch
    assert [len(w) for w in windows(batches, plan.grad_accum)] == plan.window_sizes()
    if batches:
        assert len(batches[-1]) == plan.last_micro_batch_size


@pytest.mark.parametrize(
    ("world", "accum", "total"), [(1, 1, 9380), (1, 4, 2350), (4, 4, 590), (7, 4, 340)]
)
def test_textbook_table(world: int, accum: int, total: int) -> None:
    plan = StepPlan(60000, 10, 64, world, accum, drop_last=False)
    assert plan.total_steps == total
    assert plan.textbook_steps == pytest.approx(60000 * 10 / (world * 64 * accum))


def test_textbook_example_n1000_batch100() -> None:
    plan = StepPlan(1000, 1, 100, 1, 1, False)
    assert plan.micro_batches_per_epoch == 10 and plan.steps_per_epoch == 10
    halved = StepPlan(1000, 1, 100, 1, 2, False)
    assert halved.micro_batches_per_epoch == 10 and halved.steps_per_epoch == 5
    assert "Total optimizer steps" in halved.banner() and "= 5" in halved.banner()


def test_padding_and_dropping_follow_distributed_sampler() -> None:
    padded = StepPlan(10, 1, 4, 3, 1, drop_last=False)
    assert padded.samples_per_rank == 4 and padded.padding == 2
    dropped = StepPlan(10, 1, 4, 3, 1, drop_last=True)
    assert dropped.samples_per_rank == 3 and dropped.dropped_by_sampler == 1
    assert dropped.micro_batches_per_epoch == 0  # batch larger than a shard: nothing to train


def test_counter_reports_every_mismatch() -> None:
    plan = StepPlan(100, 2, 10, 1, 3, False)
    good = StepCounter(plan.total_micro_batches, plan.total_steps, plan.samples_seen, 2)
    assert good.compare(plan) == {}
    bad = StepCounter(plan.total_micro_batches, plan.total_steps - 1, plan.samples_seen, 2)
    assert bad.compare(plan) == {"total_steps": (plan.total_steps - 1, plan.total_steps)}
