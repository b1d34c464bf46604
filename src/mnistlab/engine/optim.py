"""The optimizer a run trains with, from the ``optimizer`` config node."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def build_optimizer(cfg: Any, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """torch's optimizer; ``optimizer.fused`` picks its fused kernel (one op updates every
    tensor: on a small model the per-tensor updates cost more than the arithmetic). Weight
    decay is the regularizer's job (``regularizer.l2``), never the optimizer's."""
    impl = {"fused": True} if cfg.fused else {}  # false: torch's default implementation
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **impl
        )
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), **impl)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=0.0, **impl)
