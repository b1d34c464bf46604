"""The two model families: an MLP and a small CNN, each with optional BatchNorm and dropout.

BatchNorm's ``momentum`` goes to PyTorch untouched: it is the weight of the *new* batch
(``running = (1 - m) * running + m * batch``); ``None`` makes it a cumulative average.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def _hidden_block(
    layer: nn.Module, width: int, bn: bool, momentum: float | None, dropout: float, dims: int
) -> list[nn.Module]:
    """layer -> [BN] -> ReLU -> [Dropout]; the layer's bias is dropped when BN follows."""
    block: list[nn.Module] = [layer]
    if bn:
        norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        block.append(norm(width, momentum=momentum))
    block.append(nn.ReLU(inplace=True))
    if dropout > 0:
        block.append(nn.Dropout(dropout) if dims == 1 else nn.Dropout2d(dropout))
    return block


def mlp(
    in_shape: tuple[int, int, int],
    num_classes: int,
    hidden: Sequence[int],
    bn: bool,
    bn_momentum: float | None,
    dropout: float,
) -> nn.Sequential:
    c, h, w = in_shape
    layers: list[nn.Module] = [nn.Flatten()]
    width = c * h * w
    for out in hidden:
        layers += _hidden_block(
            nn.Linear(width, out, bias=not bn), out, bn, bn_momentum, dropout, 1
        )
        width = out
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(
    in_shape: tuple[int, int, int],
    num_classes: int,
    channels: Sequence[int],
    hidden: Sequence[int],
    bn: bool,
    bn_momentum: float | None,
    dropout: float,
) -> nn.Sequential:
    """Two 3x3 conv blocks with 2x2 pooling, then an MLP head: works for 8x8 and 28x28."""
    c, h, w = in_shape
    layers: list[nn.Module] = []
    for out in channels:
        conv = nn.Conv2d(c, out, 3, padding=1, bias=not bn)
        layers += _hidden_block(conv, out, bn, bn_momentum, 0.0, 2)
        layers.append(nn.MaxPool2d(2))
        c, h, w = out, h // 2, w // 2
    layers.append(nn.Flatten())
    width = c * h * w
    for out in hidden[:1]:
        layers += _hidden_block(
            nn.Linear(width, out, bias=not bn), out, bn, bn_momentum, dropout, 1
        )
        width = out
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def build(
    name: str,
    in_shape: tuple[int, int, int],
    num_classes: int,
    hidden: Sequence[int],
    channels: Sequence[int],
    bn: bool,
    bn_momentum: float | None,
    dropout: float,
) -> nn.Sequential:
    if name == "mlp":
        return mlp(in_shape, num_classes, hidden, bn, bn_momentum, dropout)
    if name == "cnn":
        return cnn(in_shape, num_classes, channels, hidden, bn, bn_momentum, dropout)
    raise ValueError(f"model.name={name!r} is not allowed: one of mlp, cnn")


def bn_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer by its qualified name, upstream first."""
    return {
        n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
