"""The loop's arithmetic: an accumulation window's update is the gradient of a true average."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from mnistlab.engine.data import Split
from mnistlab.engine.loop import Loop, LoopConfig
from mnistlab.engine.regularizers import Regularizer
from mnistlab.engine.steps import Cadence, StepCounter, StepPlan
from mnistlab.logger.sinks import Sinks

from support import TorchThreads


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one torch thread each test (see ``support.TorchThreads``)."""
    with TorchThreads(1):
        yield


def fit(model: nn.Module, opt: torch.optim.Optimizer, plan: StepPlan, split: Split) -> StepCounter:
    """The real loop, no sinks, no callbacks; training and test data the same."""
    cfg = LoopConfig(seed=0, cadence=Cadence.of(plan.total_steps))
    return Loop(model, opt, Regularizer([]), plan, split, split, Sinks(), cfg).fit().counter


def test_uneven_window_update_equals_full_batch_mean_gradient() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(10, 1, 2, 2), torch.randint(0, 3, (10,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    start = [p.detach().clone() for p in model.parameters()]
    # batch 4 over 10 samples: micro-batches of 4, 4, 2, all in one window of 3
    plan = StepPlan(10, 1, 4, 1, 3, drop_last=False)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    counter = fit(model, opt, plan, Split(x, y))
    assert (counter.micro_batches, counter.optimizer_steps) == (3, 1)

    ref = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        for p, s in zip(ref.parameters(), start, strict=True):
            p.copy_(s)
    nn.functional.cross_entropy(ref(x), y).backward()  # mean over all 10 samples
    for p, r, s in zip(model.parameters(), ref.parameters(), start, strict=True):
        torch.testing.assert_close(p.detach(), s - r.grad, rtol=1e-5, atol=1e-6)


def test_short_last_window_still_steps() -> None:
    x, y = torch.randn(10, 1, 2, 2), torch.randint(0, 3, (10,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    plan = StepPlan(10, 2, 3, 1, 3, drop_last=False)  # 4 micro-batches: windows of 3 and 1
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    counter = fit(model, opt, plan, Split(x, y))
    assert counter.optimizer_steps == plan.total_steps == 4
    assert counter.compare(plan) == {}
