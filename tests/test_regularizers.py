"""Regularizers: proximal L1 makes exact zeros, L2 shrinks, dropout is train-only, BN is spared."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from mnistlab.config import ModelConfig, RegularizerConfig
from mnistlab.engine import models, regularizers

from support import TorchThreads, app, read_jsonl, read_summary


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one torch thread each test (see ``support.TorchThreads``)."""
    with TorchThreads(1):
        yield


QUIET = ("trainer.num_threads=1", "logger=none", "trainer.progress=none")


def _mlp(dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    return models.build(ModelConfig(hidden=[32, 16]), (1, 8, 8), 10, dropout)


def test_penalty_values_and_excluded_parameters_get_no_gradient() -> None:
    model = _mlp()
    penalties = RegularizerConfig(l1=0.01, l2=0.1, l1_mode="penalty")
    reg = regularizers.build(model, penalties)
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    expected = sum(0.01 * w.abs().sum() + 0.05 * w.pow(2).sum() for w in weights)
    penalty = reg.penalty()
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    for name, p in model.named_parameters():
        is_weight = name.endswith("weight") and p.ndim > 1
        if is_weight:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:  # BN scale/shift and biases: untouched by the penalty
            assert p.grad is None or not p.grad.any(), name
    l1_all = RegularizerConfig(l1=0.01, l1_mode="penalty", exclude_bn_and_bias=False)
    everything = regularizers.build(model, l1_all)
    assert len(everything.params) == len(list(model.parameters())) > len(reg.params)


def test_proximal_step_soft_thresholds_to_exact_zeros() -> None:
    w = nn.Parameter(torch.tensor([0.5, -0.5, 0.001, -0.002, 0.0]))
    reg = regularizers.Regularizer([w], l1=0.1, l1_mode="proximal")
    assert not reg.adds_to_loss
    reg.after_step(lr=0.01)  # threshold 0.001
    torch.testing.assert_close(w.detach(), torch.tensor([0.499, -0.499, 0.0, -0.001, 0.0]))


def test_decoupled_decay_shrinks_every_weight_by_the_same_factor() -> None:
    w = nn.Parameter(torch.tensor([2.0, -4.0]))
    reg = regularizers.Regularizer([w], l2=0.5, l2_mode="decoupled")
    assert not reg.adds_to_loss
    reg.after_step(lr=0.1)
    torch.testing.assert_close(w.detach(), torch.tensor([2.0, -4.0]) * 0.95)


def test_dropout_changes_train_outputs_and_eval_is_deterministic() -> None:
    model = _mlp(dropout=0.5)
    x = torch.randn(64, 1, 8, 8)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    assert any(isinstance(m, nn.Dropout) for m in model.modules())
    cnn = models.build(ModelConfig("cnn", hidden=[32], channels=[4, 8]), (1, 28, 28), 10, 0.5)
    assert any(isinstance(m, nn.Dropout) for m in cnn.modules())


@pytest.fixture(scope="module")
def five_way(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The README's sweep (``make readme-table``): the five regularizers on the default config,
    each job's folder by its regularizer's name."""
    sweep = tmp_path_factory.mktemp("regularizers") / "sweep"
    p = app(sweep, *QUIET, "regularizer=none,l1,l2,dropout,elastic", multirun=True)
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = [sweep / str(job) for job in range(5)]
    return {read_summary(job)["config"]["regularizer"]["name"]: job for job in jobs}


@pytest.mark.slow
def test_effects_on_the_default_config(five_way: dict[str, Path], tmp_path: Path) -> None:
    """Proximal L1 at the documented lambda (2e-2) zeros >= 30% of weights; L2 shrinks norms."""
    results = {name: read_summary(five_way[name])["final"] for name in ("none", "l1", "l2")}
    for name, extra in {
        "l2_decoupled": ("regularizer=l2", "regularizer.l2_mode=decoupled"),
        "l1_penalty": ("regularizer=l1", "regularizer.l1_mode=penalty"),
    }.items():
        p = app(tmp_path / name, *QUIET, *extra)
        assert p.returncode == 0, p.stderr
        results[name] = read_summary(tmp_path / name)["final"]
    assert results["l1"]["weights/sparsity_exact"] >= 0.30
    assert results["none"]["weights/sparsity_exact"] == 0.0
    assert results["l1_penalty"]["weights/sparsity_exact"] < 0.01  # subgradient: hovers near 0
    assert results["l1_penalty"]["reg/penalty"] > 0
    for l2 in ("l2", "l2_decoupled"):
        assert results[l2]["weights/l2_norm"] < results["none"]["weights/l2_norm"]
    rows = read_jsonl(tmp_path / "l1_penalty" / "metrics.jsonl")
    logged = [r for r in rows if "reg/penalty" in r]
    assert logged and all(r["reg/penalty"] > 0 and "train/loss" in r for r in logged)


@pytest.mark.slow
def test_five_way_sweep(five_way: dict[str, Path]) -> None:
    assert set(five_way) == {"none", "l1", "l2", "dropout", "elastic"}
    for job in five_way.values():
        s = read_summary(job)
        assert s["status"] == "completed"
        for key in (
            "reg/penalty",
            "weights/l1_norm",
            "weights/l2_norm",
            "weights/sparsity_exact",
            "weights/sparsity_1e-3",
            "train_eval/acc",
            "test/acc",
            "train_test_gap",
        ):
            assert key in s["final"], key


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("regularizer.l1=-0.1", "regularizer.l1"),
        ("regularizer.l1_mode=lasso", "regularizer.l1_mode"),
        ("regularizer.l2_mode=ridge", "regularizer.l2_mode"),
        ("regularizer.dropout=-0.1", "regularizer.dropout"),
    ],
)
def test_bad_values_fail_in_one_line(tmp_path: Path, override: str, key: str) -> None:
    p = app(tmp_path / "run", *QUIET, override)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert next(ln for ln in p.stderr.splitlines() if ln.startswith("error:")).startswith(
        f"error: {key}="
    )
