"""The model families: LeNet-5 with BatchNorm, added as one builder and one yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from mnistlab.config import CONF_DIR, register
from mnistlab.core.errors import ConfigError
from mnistlab.engine import models

from support import app, read_summary


def _lenet_cfg(*overrides: str):  # type: ignore[no-untyped-def]
    """The ``model`` node exactly as ``model=lenet`` composes it."""
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=["model=lenet", *overrides]).model


@pytest.mark.parametrize("size", [8, 28])
def test_lenet_takes_digits_and_mnist_shapes(size: int) -> None:
    cfg = _lenet_cfg()
    assert (list(cfg.channels), list(cfg.hidden)) == ([6, 16], [120, 84])
    net = models.build(cfg, (1, size, size), 10, dropout=0.3)
    x = torch.randn(5, 1, size, size)
    assert net(x).shape == (5, 10)  # train mode: BN uses the batch
    net.eval()
    assert net(x).shape == (5, 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(6, (5, 5)), (16, (5, 5))]
    flat = 16 * (size // 4) ** 2  # "same" padding: only the two pools shrink the maps
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(flat, 120), (120, 84), (84, 10)]
    bn = models.bn_layers(net)
    assert [type(m).__name__ for m in bn.values()] == ["BatchNorm2d"] * 2 + ["BatchNorm1d"] * 2
    assert [m.num_features for m in bn.values()] == [6, 16, 120, 84]
    assert sum(isinstance(m, nn.Dropout) for m in net.modules()) == 2  # after each dense layer


def test_lenet_shape_rules() -> None:
    with pytest.raises(ConfigError, match=r"model.channels=\[6\].*two conv widths for lenet"):
        models.build(_lenet_cfg("model.channels=[6]"), (1, 8, 8), 10, 0.0)
    no_bn = models.build(_lenet_cfg("model.bn=false"), (1, 8, 8), 10, 0.0)
    assert not models.bn_layers(no_bn)


@pytest.mark.slow
def test_lenet_learns_the_digits_through_the_app(tmp_path: Path) -> None:
    run = tmp_path / "run"
    p = app(run, "model=lenet", "trainer.epochs=3", "trainer.num_threads=1", "logger=none")
    assert p.returncode == 0, p.stderr
    s = read_summary(run)
    assert s["status"] == "completed" and s["config"]["model"]["name"] == "lenet"
    assert s["final"]["test/acc"] >= 0.9  # 0.96 measured; chance is 0.1
    # two conv BNs, two dense BNs (no dropout layers between them without regularizer=dropout)
    assert set(s["bn"]) == {"1", "5", "10", "13"} and s["bn_updates_equal_micro_batches"]
