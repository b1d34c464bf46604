"""The loops ours is measured against, and the FLOPs of one training step.

* ``baseline_rate``: the pytorch/examples ``mnist/main.py``-style loop (torchvision MNIST,
  per-sample transforms, ``DataLoader`` batch 64): what a user would otherwise write;
* ``bare_step_parts``: a bare eager loop over tensors already in memory: what eager PyTorch
  itself reaches, with the time of each part of a step.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from mnistlab.engine import data, models
from mnistlab.engine.optim import build_optimizer

from .common import Bench, sync
from .runs import compose, mnist_overrides


def baseline_rate(b: Bench, model_name: str, samples: int, num_workers: int) -> float:
    """pytorch/examples ``mnist/main.py``'s loop: samples/s after its first batch."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    cfg = compose(mnist_overrides(b, model_name, samples))
    m, o = cfg.model, cfg.optimizer
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
    )
    ds = datasets.MNIST(str(b.root), train=True, download=False, transform=transform)
    kwargs: dict[str, Any] = {"batch_size": 64, "shuffle": True, "num_workers": num_workers}
    if num_workers > 0 and b.device == "cuda":
        kwargs["pin_memory"] = True
    loader = DataLoader(ds, **kwargs)
    torch.manual_seed(0)
    device = torch.device(b.device)
    model = models.build(m, (1, 28, 28), 10, 0.0)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum)
    model.train()
    seen, t0 = 0, 0.0
    for batch_idx, (x, y) in enumerate(loader):
        if batch_idx == 1:  # the first batch (worker start, allocator warm-up) is not timed
            sync(b.device)
            t0, seen = time.perf_counter(), 0
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = F.nll_loss(F.log_softmax(model(x), dim=1), y)
        loss.backward()
        optimizer.step()
        if batch_idx % 10 == 0:  # log_interval=10: examples read the loss there
            loss.item()
        seen += len(y)
        if seen >= samples and batch_idx >= 1:
            break
    sync(b.device)
    return seen / (time.perf_counter() - t0)


def bare_step_parts(b: Bench, overrides: list[str], batch: int) -> tuple[float, dict[str, float]]:
    """The same model, data and SGD trained by a bare loop (gather, forward, backward, step;
    no logging, BN points, checkpoints or bookkeeping): samples/s over one epoch, and the
    seconds per step of each part. What eager PyTorch itself reaches on this machine."""
    cfg = compose([*overrides, f"trainer.batch_size={batch}"])
    m = cfg.model
    ds = data.load(cfg.dataset)
    x_all, y_all = ds.train.x.to(b.device), ds.train.y.to(b.device)
    torch.manual_seed(0)
    model = models.build(m, ds.image_shape, 10, 0.0)
    model = model.to(b.device).train()
    optimizer = build_optimizer(
        cfg.optimizer, model.parameters()
    )  # the app's own: the same implementation
    parts = dict.fromkeys(("gather", "forward", "backward", "optimizer"), 0.0)
    order = torch.randperm(len(x_all), device=b.device)
    sync(b.device)
    t_start = time.perf_counter()
    for idx in order.split(batch):
        t0 = time.perf_counter()
        x, y = x_all.index_select(0, idx), y_all.index_select(0, idx)
        sync(b.device)
        t1 = time.perf_counter()
        loss = F.cross_entropy(model(x), y, reduction="sum") / len(idx)
        sync(b.device)
        t2 = time.perf_counter()
        loss.backward()
        sync(b.device)
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(b.device)
        t4 = time.perf_counter()
        for k, dt_ in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            parts[k] += dt_
    rate = len(x_all) / (time.perf_counter() - t_start)
    steps = math.ceil(len(x_all) / batch)
    return rate, {k: v / steps for k, v in parts.items()}


def train_flops_per_sample(model: torch.nn.Module, shape: tuple[int, ...], batch: int) -> float:
    """Matrix-product FLOPs of one training step per sample, as torch's own ``FlopCounterMode``
    counts the ops really dispatched. Not the ``6 x weights`` rule: the first layer computes no
    gradient for its input, so its backward does half the work that rule assumes."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def config_flops_per_sample(overrides: list[str], batch: int = 512) -> float:
    """``train_flops_per_sample`` of the model these overrides compose, on their dataset's
    image shape (8x8 digits, else 28x28 MNIST)."""
    cfg = compose(overrides)
    shape = (1, 8, 8) if cfg.dataset.name == "digits" else (1, 28, 28)
    net = models.build(cfg.model, shape, 10, 0.0)
    return train_flops_per_sample(net, shape, batch)
