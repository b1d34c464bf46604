"""PreciseBN: replace every BN layer's running statistics by the exact ones
(:func:`recalibrate`), upstream first. The caveat: it measures the model as it is now, so it
belongs at the end of training (or before an evaluation), not between steps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mnistlab.bn.stats import LayerStats, exact_stats
from mnistlab.engine.models import bn_layers, unwrap


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    x: Tensor,
    index: Tensor | None = None,
    batch_size: int = 32,
    chunk_size: int = 1024,
    precision: str = "fp32",
) -> dict[str, LayerStats]:
    """Replace every BN layer's running statistics by the exact ones, upstream first.

    Each layer's statistics depend on the (eval-mode) layers above it, so layer k is measured
    only after layers 1..k-1 were replaced: one pass per layer, each stopped at its layer.
    """
    inner = unwrap(model)
    layers = bn_layers(inner)
    order: list[str] = []
    exact_stats(inner, x, index, batch_size, chunk_size, precision, order=order)
    order += [n for n in layers if n not in order]  # layers the forward never reached
    out: dict[str, LayerStats] = {}
    for name in order:
        s = exact_stats(inner, x, index, batch_size, chunk_size, precision, layers=[name])[name]
        if s.data.count > 1:
            layers[name].running_mean.copy_(s.data.mean.to(layers[name].running_mean))
            layers[name].running_var.copy_(s.data.var.to(layers[name].running_var))
        out[name] = s
    return out
