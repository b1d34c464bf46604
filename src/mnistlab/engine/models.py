"""The model families, and the few facts about a model that other modules need.

Each family is one builder in :data:`MODELS` (plus one ``conf/model/<name>.yaml``): a
function of the ``model`` config node, the image shape, the class count and the dropout rate.
``model._target_`` names your own ``nn.Module`` instead (``model.args`` are its keyword
arguments): its BatchNorm layers are found and measured like the families'.

BatchNorm's ``momentum`` goes to PyTorch untouched: it is the weight of the *new* batch
(``running = (1 - m) * running + m * batch``); ``None`` makes it a cumulative average.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mnistlab.core.errors import ConfigError
from mnistlab.core.imports import locate

Shape = tuple[int, int, int]  # (channels, height, width)


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


def _dense(width: int, hidden: Any, cfg: Any, dropout: float) -> tuple[list[nn.Module], int]:
    """[Linear -> BN -> ReLU -> Dropout] per hidden width; returns the layers and the width."""
    layers: list[nn.Module] = []
    for out in hidden:
        linear = nn.Linear(width, out, bias=not cfg.bn)
        layers += _hidden_block(linear, out, cfg.bn, cfg.bn_momentum, dropout, 1)
        width = out
    return layers, width


def mlp(cfg: Any, in_shape: Shape, num_classes: int, dropout: float) -> nn.Sequential:
    """Flatten -> [Linear -> BN -> ReLU -> Dropout] x len(hidden) -> Linear."""
    c, h, w = in_shape
    layers, width = _dense(c * h * w, cfg.hidden, cfg, dropout)
    return nn.Sequential(nn.Flatten(), *layers, nn.Linear(width, num_classes))


def _convs(cfg: Any, in_shape: Shape, kernel: int) -> tuple[list[nn.Module], int]:
    """[Conv kernel x kernel -> BN -> ReLU -> MaxPool2] per width in ``channels``; returns the
    layers and the flattened size. "Same" padding keeps the size until each pool halves it, so
    two blocks take the 8x8 digits (8 -> 4 -> 2) as well as 28x28 images (28 -> 14 -> 7)."""
    c, h, w = in_shape
    layers: list[nn.Module] = []
    for out in cfg.channels:
        conv = nn.Conv2d(c, out, kernel, padding=kernel // 2, bias=not cfg.bn)
        layers += _hidden_block(conv, out, cfg.bn, cfg.bn_momentum, 0.0, 2)
        layers.append(nn.MaxPool2d(2))
        c, h, w = out, h // 2, w // 2
    return layers, c * h * w


def cnn(cfg: Any, in_shape: Shape, num_classes: int, dropout: float) -> nn.Sequential:
    """Two 3x3 conv blocks with 2x2 pooling, then an MLP head: works for 8x8 and 28x28."""
    layers, width = _convs(cfg, in_shape, 3)
    head, width = _dense(width, list(cfg.hidden)[:1], cfg, dropout)
    return nn.Sequential(*layers, nn.Flatten(), *head, nn.Linear(width, num_classes))


def lenet(cfg: Any, in_shape: Shape, num_classes: int, dropout: float) -> nn.Sequential:
    """LeNet-5 with BatchNorm: two 5x5 conv blocks (``channels``: 6, 16), then a dense layer
    per ``hidden`` width (120, 84), each with BN, ReLU and dropout, then the classifier."""
    layers, width = _convs(cfg, in_shape, 5)
    head, width = _dense(width, cfg.hidden, cfg, dropout)
    return nn.Sequential(*layers, nn.Flatten(), *head, nn.Linear(width, num_classes))


def _two_conv_widths(cfg: Any) -> None:
    if len(cfg.channels) != 2:
        raise ConfigError(
            "model.channels", list(cfg.channels), f"exactly two conv widths for {cfg.name}"
        )


@dataclass(frozen=True)
class Family:
    build: Callable[[Any, Shape, int, float], nn.Module]
    check: Callable[[Any], None] | None = None  # shape rules the schema can't express


# One line per model family; its yaml in conf/model/ names the same key.
MODELS: dict[str, Family] = {
    "mlp": Family(mlp),
    "cnn": Family(cnn, _two_conv_widths),
    "lenet": Family(lenet, _two_conv_widths),
}


def check(cfg: Any) -> None:
    """Refuse an unknown family, a shape it can't build, or a ``_target_`` that cannot be
    imported, before any work."""
    if getattr(cfg, "_target_", None):
        locate(cfg._target_, "model._target_")
        return
    if cfg.name not in MODELS:
        raise ConfigError("model.name", cfg.name, "one of " + ", ".join(MODELS))
    if MODELS[cfg.name].check is not None:
        MODELS[cfg.name].check(cfg)  # type: ignore[misc]


def smallest_batch(cfg: Any) -> int:
    """The fewest samples a training micro-batch may hold: BatchNorm normalizes each channel
    over the batch, and one sample has no spread (BatchNorm1d refuses it in training). Your own
    module may hold BatchNorm layers: 2, as if it did."""
    return 2 if cfg.bn or getattr(cfg, "_target_", None) else 1


def build(cfg: Any, in_shape: Shape, num_classes: int, dropout: float) -> nn.Module:
    """The ``model`` config node's network for images of ``in_shape``, checked with one
    forward pass before any work (:func:`check_forward`)."""
    check(cfg)
    if getattr(cfg, "_target_", None):
        key, value = "model._target_", cfg._target_
        if dropout > 0:
            allowed = "0 with model._target_ (put dropout layers in your module)"
            raise ConfigError("regularizer.dropout", dropout, allowed)
        net = locate(value, key)(**dict(getattr(cfg, "args", None) or {}))
        if not isinstance(net, nn.Module):
            raise ConfigError(key, value, f"an nn.Module class; it made a {type(net).__name__}")
    else:
        key, value = "model.name", cfg.name
        net = MODELS[cfg.name].build(cfg, in_shape, num_classes, dropout)
    check_forward(net, in_shape, num_classes, key, value)
    return net


def check_forward(net: nn.Module, in_shape: Shape, num_classes: int, key: str, value: Any) -> None:
    """One forward pass in eval mode (no running statistic moves, no random draw) on two
    blank images of the data's shape: the model must map ``[B, C, H, W]`` images to
    ``[B, num_classes]`` logits, as the loop and the BN measurement need. A model too deep for
    small images, or your own module built for other ones, is one line naming ``key``."""
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    shape = ", ".join(map(str, in_shape))
    wanted = f"a model mapping this data's [B, {shape}] images to [B, {num_classes}] logits"
    was = net.training
    try:
        with torch.no_grad():
            out = net.eval()(torch.zeros(2, *in_shape, device=device))
    except Exception as e:
        raise ConfigError(key, value, f"{wanted}; its forward failed: {e}") from None
    finally:
        net.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(key, value, f"{wanted}; it gave {got}")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (``module``) and ``torch.compile`` (``_orig_mod``): its
    parameter names, state dict and hooks are the model's own."""
    for attr in ("module", "_orig_mod", "module"):
        model = getattr(model, attr, model)
    return model


def bn_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """Every BatchNorm layer that keeps running statistics, by qualified name, upstream first."""
    return {
        n: m
        for n, m in unwrap(model).named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    }


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``trainer.precision``: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(model: nn.Module, device: torch.device) -> torch.memory_format:
    """NHWC (channels_last) for convolutions on CUDA, cuDNN's fast layout; else the default."""
    convs = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return torch.channels_last if convs and device.type == "cuda" else torch.contiguous_format


TRAIN_FACTOR = 3.0  # a training sample's FLOPs / its forward's: forward and backward


@torch.inference_mode()
def forward_flops(model: nn.Module, x: Tensor) -> tuple[float, float]:
    """FLOPs of one sample's forward (linear and convolution layers, 2 per multiply-add):
    up to the last BN layer's input (what the pass runs) and in all. ``x``: a few samples."""
    model = unwrap(model)
    done = [0.0]
    at_bn = [0.0]

    def count(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        w = getattr(module, "weight", None)
        if w is not None:
            per_out = w[0].numel()  # in_features, or in_channels / groups x kernel
            done[0] += 2.0 * per_out * out.numel() / max(1, out.shape[0])

    def bn(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        at_bn[0] = done[0]

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, kinds)]
    handles += [m.register_forward_pre_hook(bn) for m in bn_layers(model).values()]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return at_bn[0], done[0]
