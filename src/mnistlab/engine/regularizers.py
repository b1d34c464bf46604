"""L1, L2 and their modes, applied to a chosen set of parameters, and the weight metrics.

* L1 ``penalty`` adds ``l1 * sum|w|`` to the loss: its subgradient pushes weights toward 0
  but SGD steps overshoot, so they hover near zero and rarely reach it.
* L1 ``proximal`` soft-thresholds after each optimizer step
  (``w <- sign(w) * max(|w| - lr * l1, 0)``): the proximal-gradient method for the same
  objective, which produces exact zeros.
* L2 ``penalty`` adds ``(l2 / 2) * sum w^2`` to the loss, so its gradient ``l2 * w`` flows
  through the optimizer. With Adam that gradient is divided by the running RMS of the
  gradients, so weights with large gradients are barely decayed.
* L2 ``decoupled`` (AdamW's weight decay) shrinks ``w <- w * (1 - lr * l2)`` outside the
  optimizer, the same for every weight whatever its gradient history. With plain SGD the
  two are the same update; with adaptive optimizers they differ.

Dropout lives in the models; BN parameters and biases are excluded by default because
shrinking a scale or a shift does not limit a network's capacity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

SMALL = 1e-3  # weights below this magnitude count as "near zero" in the sparsity metric


def regularized_parameters(model: nn.Module, exclude_bn_and_bias: bool) -> list[nn.Parameter]:
    """Weights of linear and conv layers; everything trainable when nothing is excluded."""
    if not exclude_bn_and_bias:
        return [p for p in model.parameters() if p.requires_grad]
    return [
        m.weight
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m.weight.requires_grad
    ]


@dataclass
class Regularizer:
    params: list[nn.Parameter]
    l1: float = 0.0
    l2: float = 0.0
    l1_mode: str = "proximal"
    l2_mode: str = "penalty"

    @property
    def adds_to_loss(self) -> bool:
        return (self.l1 > 0 and self.l1_mode == "penalty") or (
            self.l2 > 0 and self.l2_mode == "penalty"
        )

    def penalty(self) -> Tensor:
        """The loss-side part: ``l1 * sum|w|`` and/or ``(l2 / 2) * sum w^2``."""
        total = torch.zeros((), device=self.params[0].device) if self.params else torch.zeros(())
        for p in self.params:
            if self.l1 > 0 and self.l1_mode == "penalty":
                total = total + self.l1 * p.abs().sum()
            if self.l2 > 0 and self.l2_mode == "penalty":
                total = total + 0.5 * self.l2 * p.pow(2).sum()
        return total

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        """The update-side part: decoupled decay, then L1's proximal soft-threshold."""
        for p in self.params:
            if self.l2 > 0 and self.l2_mode == "decoupled":
                p.mul_(1.0 - lr * self.l2)
            if self.l1 > 0 and self.l1_mode == "proximal":
                p.copy_(p.sign() * (p.abs() - lr * self.l1).clamp_min_(0.0))

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """Norms and sparsity of the regularized weights, read from the device at once (this
        runs on every logged row)."""
        if not self.params:
            return {}
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        mag = flat.abs()
        sums = [
            mag.sum(),
            flat.dot(flat),
            torch.count_nonzero(flat),
            torch.count_nonzero(mag < SMALL),
        ]
        l1, sq, nonzero, small = torch.stack([v.double() for v in sums]).tolist()
        n = flat.numel()
        zeros = n - nonzero
        return {
            "weights/l1_norm": l1,
            "weights/l2_norm": math.sqrt(sq),
            "weights/sparsity_exact": zeros / n,
            "weights/sparsity_1e-3": small / n,
            "weights/count": int(n),
            "reg/penalty": self.l1 * l1 + 0.5 * self.l2 * sq,  # whichever mode applies it
        }


def build(model: nn.Module, cfg: Any) -> Regularizer:
    """The ``regularizer`` config node's penalties on ``model``'s chosen parameters."""
    params = regularized_parameters(model, cfg.exclude_bn_and_bias)
    return Regularizer(params, cfg.l1, cfg.l2, cfg.l1_mode, cfg.l2_mode)
