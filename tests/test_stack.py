"""The stacked model (:mod:`mnistlab.sweeps.stack`): ``G`` copies trained as one computation
train as each copy trains alone (losses, weights, BN statistics, optimizer state, dropout
masks), keep a lone run's checkpoint format, and stay independent lanes.

Every random draw here is from a seeded generator, or inside ``torch.random.fork_rng``: the
process's global stream is left as it was."""

from __future__ import annotations

import copy
import functools
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from mnistlab.engine import models, regularizers
from mnistlab.engine.checkpoint import own_storage
from mnistlab.engine.optim import build_optimizer
from mnistlab.engine.regularizers import Regularizer
from mnistlab.sweeps.stack import Stack, signature

DIGITS = (1, 8, 8)
MNIST = (1, 28, 28)
CLASSES = 10
BN_MOMENTA = (0.1, None, 0.3, 0.01)  # None: the cumulative average
STEPS, BATCH, SAMPLES = 50, 16, 256

SGD = {
    "optimizer.lr": (0.05, 0.1, 0.02, 0.01),
    "optimizer.momentum": (0.9, 0.0, 0.5, 0.9),
    "model.bn_momentum": BN_MOMENTA,
}
ADAM = {
    "optimizer.lr": (1e-3, 3e-3, 2e-3, 1.5e-3),
    "optimizer.betas": ([0.9, 0.999], [0.8, 0.99], [0.9, 0.999], [0.95, 0.999]),
    "model.bn_momentum": BN_MOMENTA,
}
DROPOUT = {"regularizer.dropout": (0.2, 0.3, 0.3, 0.2)}
L1_L2 = {"regularizer.l1": (1e-2, 0.0, 3e-3, 0.0), "regularizer.l2": (1e-2, 5e-3, 0.0, 0.0)}
PENALTIES = {"regularizer.l1_mode": "penalty", "regularizer.l2_mode": "penalty"}


@pytest.fixture(autouse=True)
def isolated() -> Iterator[None]:
    """One intra-op thread during each test, the process's count restored after it (on a
    small shared CPU, OpenMP threads spin waiting for descheduled partners: these tiny ops ran
    20x slower with two), and the global random stream as it was (layers built here draw)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)


def config(common: dict[str, Any] | None = None) -> DictConfig:
    """One copy's ``model``, ``optimizer`` and ``regularizer`` nodes; ``common`` overrides
    dotted keys."""
    cfg = OmegaConf.create(
        {
            "model": {
                "name": "mlp",
                "hidden": [32, 16],
                "channels": [4, 8],
                "bn": True,
                "bn_momentum": 0.1,
            },
            "optimizer": {
                "name": "sgd",
                "lr": 0.05,
                "momentum": 0.9,
                "nesterov": False,
                "betas": [0.9, 0.999],
                "fused": True,
            },
            "regularizer": {
                "l1": 0.0,
                "l2": 0.0,
                "l1_mode": "proximal",
                "l2_mode": "decoupled",
                "dropout": 0.0,
                "exclude_bn_and_bias": True,
            },
        }
    )
    for key, value in (common or {}).items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def copies(
    common: dict[str, Any] | None = None, lanes: dict[str, Sequence[Any]] | None = None
) -> list[DictConfig]:
    """Four copies' configs: ``common`` for all, ``lanes[key][j]`` for copy ``j``."""
    out = []
    for j in range(4):
        cfg = config(common)
        for key, values in (lanes or {}).items():
            OmegaConf.update(cfg, key, values[j], merge=False)
        out.append(cfg)
    return out


@dataclass
class Copy:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    regularizer: Regularizer


def build(cfg: DictConfig, seed: int, shape: tuple[int, int, int] = DIGITS) -> Copy:
    """A copy as a run builds it: the model after ``manual_seed(seed)``, its optimizer and
    regularizer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = models.build(cfg.model, shape, CLASSES, cfg.regularizer.dropout)
    return Copy(
        model,
        build_optimizer(cfg.optimizer, model.parameters()),
        regularizers.build(model, cfg.regularizer),
    )


def stack_of(built: Sequence[Copy], seeds: Sequence[int] | None = None) -> Stack:
    """The copies as one stack; copy ``j``'s dropout generator seeded ``100 + j``."""
    seeds = seeds if seeds is not None else [100 + j for j in range(len(built))]
    return Stack(
        [c.model for c in built],
        [c.optimizer for c in built],
        [c.regularizer for c in built],
        [torch.Generator().manual_seed(s) for s in seeds],
    )


def data(shape: tuple[int, int, int] = DIGITS, n: int = SAMPLES) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *shape, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def batches(steps: int, g: int = 4, b: int = BATCH, n: int = SAMPLES) -> Tensor:
    """``[steps, G, B]``: each copy's own samples at each step."""
    return torch.randint(0, n, (steps, g, b), generator=torch.Generator().manual_seed(1))


def lone_steps(
    c: Copy, x: Tensor, y: Tensor, idx: Tensor, rng: torch.Generator | int
) -> list[float]:
    """A copy trained alone over ``idx`` (``[steps, B]``), as the eager loop does; the
    global stream (dropout) seeded as the copy's generator, restored afterwards."""
    losses = []
    with torch.random.fork_rng(devices=[]):
        if isinstance(rng, int):
            torch.manual_seed(rng)
        else:
            torch.set_rng_state(rng.get_state())
        for i in idx:
            loss = F.cross_entropy(c.model(x[i]), y[i], reduction="sum") / len(i)
            if c.regularizer.adds_to_loss:
                loss = loss + c.regularizer.penalty()
            loss.backward()
            lr = c.optimizer.param_groups[0]["lr"]
            c.optimizer.step()
            c.regularizer.after_step(lr)
            c.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return losses


def lrs(built: Sequence[Copy]) -> list[float]:
    return [c.optimizer.param_groups[0]["lr"] for c in built]


def stacked_steps(
    stack: Stack, x: Tensor, y: Tensor, idx: Tensor, rates: Sequence[float]
) -> Tensor:
    """The stack trained over ``idx`` (``[steps, G, B]``); each copy's loss per step."""
    losses = []
    for i in idx:
        g, b = i.shape
        out = stack.forward(x[i])
        assert out.shape == (g, b, CLASSES)
        sums = F.cross_entropy(out.flatten(0, 1), y[i].flatten(), reduction="none")
        loss = sums.view(g, b).sum(1) / b
        if stack.adds_to_loss:
            loss = loss + stack.penalty()
        loss.sum().backward()
        stack.step(rates)
        losses.append(loss.detach())
    return torch.stack(losses)


def close(a: Tensor | Sequence[float], b: Tensor | Sequence[float]) -> float:
    """Largest relative difference."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


def snapshot(obj: Any) -> Any:
    """``obj`` as a checkpoint keeps it: its own storage, through ``torch.save``."""
    buf = io.BytesIO()
    torch.save(own_storage(obj), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --------------------------------------------------------------- 1, 2: training equivalence

CASES: dict[str, tuple[dict[str, Any], dict[str, Sequence[Any]]]] = {
    "sgd": ({}, SGD),
    "sgd-nesterov": (
        {"optimizer.nesterov": True},
        SGD | {"optimizer.momentum": (0.9, 0.5, 0.8, 0.9)},
    ),
    "sgd-unfused": ({"optimizer.fused": False}, SGD),
    "adam": ({"optimizer.name": "adam"}, ADAM),
    "adamw-dropout": ({"optimizer.name": "adamw"}, ADAM | DROPOUT),
    "sgd-dropout-proximal-decoupled": ({}, SGD | DROPOUT | L1_L2),
    "adamw-proximal-decoupled": ({"optimizer.name": "adamw"}, ADAM | L1_L2),
    "sgd-penalties": (PENALTIES, SGD | L1_L2),
    "adam-penalties-dropout": ({"optimizer.name": "adam"} | PENALTIES, ADAM | L1_L2 | DROPOUT),
    "sgd-decay-on-everything": ({"regularizer.exclude_bn_and_bias": False}, SGD | L1_L2),
    "cnn-sgd-dropout": ({"model.name": "cnn"}, SGD | DROPOUT),
}


@dataclass
class Trained:
    cfgs: list[DictConfig]
    lone: list[Copy]
    lone_losses: list[list[float]]
    stacked: list[Copy]
    stack: Stack
    stacked_losses: Tensor


@functools.cache
def trained(case: str) -> Trained:
    """Case ``case``'s four copies trained ``STEPS`` steps alone and as one stack."""
    cfgs = copies(*CASES[case])
    x, y = data()
    idx = batches(STEPS)
    lone = [build(c, j) for j, c in enumerate(cfgs)]
    lone_losses = [lone_steps(c, x, y, idx[:, j], 100 + j) for j, c in enumerate(lone)]
    stacked = [build(c, j) for j, c in enumerate(cfgs)]
    stack = stack_of(stacked)
    losses = stacked_steps(stack, x, y, idx, lrs(stacked))
    return Trained(cfgs, lone, lone_losses, stacked, stack, losses)


@pytest.mark.parametrize("case", list(CASES))
def test_stacked_training_losses_equal_each_copy_trained_alone(case: str) -> None:
    t = trained(case)
    assert t.stacked_losses.shape == (STEPS, 4)
    assert torch.isfinite(t.stacked_losses).all()
    for j in range(4):
        err = close(t.stacked_losses[:, j], t.lone_losses[j])
        assert err < 1e-4, (case, j, err)
    penalized = [c.regularizer.adds_to_loss for c in t.stacked]
    assert t.stack.adds_to_loss == any(penalized)
    assert penalized == ([True, True, True, False] if "penalties" in case else [False] * 4)


@pytest.mark.parametrize("case", list(CASES))
def test_stacked_training_leaves_each_copy_where_it_would_be_alone(case: str) -> None:
    """After the steps, each copy's module and optimizer (views of the stack) hold what the
    lone copy holds: parameters, BN buffers, optimizer state with the same keys."""
    t = trained(case)
    adam = t.cfgs[0].optimizer.name != "sgd"
    for j in range(4):
        lone, stacked = t.lone[j].model.state_dict(), t.stacked[j].model.state_dict()
        assert lone.keys() == stacked.keys()
        for key, want in lone.items():
            got = stacked[key]
            if key.endswith("num_batches_tracked"):
                assert int(got) == int(want) == STEPS, (case, j, key)
            elif "running" in key:  # BN statistics
                tol = 1e-4 if adam else 1e-5
                torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=f"{case} {j} {key}")
            else:
                torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4, msg=f"{case} {j} {key}")
        lone_opt = t.lone[j].optimizer.state_dict()
        stacked_opt = t.stacked[j].optimizer.state_dict()
        assert lone_opt["param_groups"] == stacked_opt["param_groups"]
        assert lone_opt["state"].keys() == stacked_opt["state"].keys(), (case, j)
        for k, state in lone_opt["state"].items():
            assert state.keys() == stacked_opt["state"][k].keys(), (case, j, k)
            for name, want in state.items():
                got = stacked_opt["state"][k][name]
                if name == "step":
                    assert float(got) == float(want) == STEPS
                else:
                    torch.testing.assert_close(
                        got, want, rtol=1e-3, atol=1e-4, msg=f"{case} {j} {k} {name}"
                    )
    if "proximal" in case and not adam:  # the soft threshold made exact zeros
        zeros = [
            int((t.stacked[0].model.state_dict()[k] == 0).sum())
            for k in t.lone[0].model.state_dict()
            if k.endswith("weight") and "." in k
        ]
        assert sum(zeros) > 0


# ------------------------------------------------------------------- 3: BN running statistics


@pytest.mark.parametrize(
    ("name", "shape"), [("mlp", DIGITS), ("cnn", DIGITS)], ids=["batchnorm1d", "batchnorm2d"]
)
def test_bn_running_statistics_equal_eager_batchnorm_per_copy_momentum(
    name: str, shape: tuple[int, int, int]
) -> None:
    cfgs = copies({"model.name": name}, {"model.bn_momentum": BN_MOMENTA})
    built = [build(c, j, shape) for j, c in enumerate(cfgs)]
    eager = [copy.deepcopy(c.model) for c in built]
    stack = stack_of(built)
    g = torch.Generator().manual_seed(5)
    for step in range(6):
        x = torch.randn(4, 12, *shape, generator=g) * (1 + step) + step  # moving statistics
        with torch.no_grad():
            stack.forward(x)
            for j, m in enumerate(eager):
                m(x[j])
    for j in range(4):
        want = {k: v for k, v in eager[j].state_dict().items() if "running" in k or "batches" in k}
        got = built[j].model.state_dict()
        assert want, "the model has BatchNorm"
        for key, value in want.items():
            if key.endswith("num_batches_tracked"):
                assert int(got[key]) == int(value) == 6
            else:
                torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=key)
    # Evaluation normalizes with those statistics: each copy's logits as its own module's.
    x = torch.randn(4, 12, *shape, generator=g)
    with torch.no_grad():
        out = stack.forward(x, training=False)
        for j, m in enumerate(eager):
            torch.testing.assert_close(out[j], m.eval()(x[j]), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- 4: forward at initialisation


@pytest.mark.parametrize(
    ("name", "shape", "common"),
    [
        ("cnn", DIGITS, {}),
        ("lenet", MNIST, {"model.channels": [6, 16], "model.hidden": [120, 84]}),
    ],
    ids=["cnn-8x8", "lenet-28x28"],
)
def test_stacked_forward_equals_each_copys_own_forward(
    name: str, shape: tuple[int, int, int], common: dict[str, Any]
) -> None:
    cfgs = copies({"model.name": name} | common, {"model.bn_momentum": BN_MOMENTA} | DROPOUT)
    built = [build(c, j, shape) for j, c in enumerate(cfgs)]
    assert any(isinstance(m, nn.Dropout) for m in built[0].model)
    eager = [copy.deepcopy(c.model) for c in built]
    stack = stack_of(built)
    x = torch.randn(4, 8, *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = stack.forward(x)
        for j, m in enumerate(eager):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(100 + j)  # the copy's generator, as its lone run's stream
                want = m(x[j])
            torch.testing.assert_close(out[j], want, rtol=1e-5, atol=1e-5, msg=f"copy {j}")


def test_dropout_before_the_flatten_draws_each_copys_own_mask() -> None:
    """Dropout on the image grid: each copy's mask from its own generator, in its shape."""

    def model(seed: int, p: float) -> nn.Sequential:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.ReLU(),
            nn.Dropout(p),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, CLASSES),
        )

    with torch.random.fork_rng(devices=[]):
        nets = [model(j, p) for j, p in enumerate((0.2, 0.5, 0.3))]
    eager = [copy.deepcopy(m) for m in nets]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in nets]
    regs = [Regularizer([]) for _ in nets]
    gens = [torch.Generator().manual_seed(100 + j) for j in range(3)]
    stack = Stack(nets, opts, regs, gens)
    x = torch.randn(3, 5, *DIGITS, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = stack.forward(x)
        for j, m in enumerate(eager):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(100 + j)
                torch.testing.assert_close(out[j], m(x[j]), rtol=1e-5, atol=1e-5)
        # Evaluation drops nothing.
        torch.testing.assert_close(
            stack.forward(x, training=False)[1], eager[1].eval()(x[1]), rtol=1e-5, atol=1e-5
        )


# ------------------------------------------------------------- 5, 6: a lone run's checkpoint


@pytest.mark.parametrize(
    "case",
    [({}, SGD), ({"optimizer.name": "adam"}, ADAM | DROPOUT)],
    ids=["sgd", "adam-dropout"],
)
def test_a_copys_checkpoint_resumes_as_a_lone_run(
    case: tuple[dict[str, Any], dict[str, Sequence[Any]]],
) -> None:
    """Copy ``j``'s model and optimizer state dicts, saved mid-training, load into a fresh lone
    model and torch optimizer, and the lone run goes on as the stack does."""
    cfgs = copies(*case)
    x, y = data()
    idx = batches(13)
    built = [build(c, j) for j, c in enumerate(cfgs)]
    stack = stack_of(built)
    stacked_steps(stack, x, y, idx[:10], lrs(built))
    saved = [(snapshot(c.model.state_dict()), snapshot(c.optimizer.state_dict())) for c in built]
    streams = [torch.Generator().set_state(g.get_state()) for g in stack.generators]
    after = stacked_steps(stack, x, y, idx[10:], lrs(built))

    # torch's own state layout, from a lone optimizer of each copy after two steps
    for j, c in enumerate(cfgs):
        probe = build(c, j)
        lone_steps(probe, x, y, idx[:2, j], 100 + j)
        want = probe.optimizer.state_dict()["state"]
        got = saved[j][1]["state"]
        assert got.keys() == want.keys(), j
        assert all(got[k].keys() == want[k].keys() for k in want), j
        if c.optimizer.name == "sgd" and c.optimizer.momentum == 0:
            assert got == {}  # torch keeps no momentum buffer without momentum
        elif c.optimizer.name == "adam":
            assert all(float(s["step"]) == 10 for s in got.values())

    for j, c in enumerate(cfgs):
        fresh = build(c, 1000 + j)  # other weights: the checkpoint must replace them all
        fresh.model.load_state_dict(saved[j][0])
        fresh.optimizer.load_state_dict(saved[j][1])
        lone = lone_steps(fresh, x, y, idx[10:, j], streams[j])
        err = close(after[:, j], lone)
        assert err < 1e-4, (j, err, after[:, j].tolist(), lone)


def test_own_storage_saves_one_copy_not_the_whole_stack() -> None:
    cfgs = copies({"model.hidden": [64, 32]}, SGD)
    built = [build(c, j) for j, c in enumerate(cfgs)]
    lone = build(cfgs[2], 2)
    stack = stack_of(built)
    x, y = data()
    stacked_steps(stack, x, y, batches(2), lrs(built))
    lone_steps(lone, x, y, batches(2)[:, 2], 102)

    def size(obj: Any) -> int:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return len(buf.getvalue())

    for what in ("model", "optimizer"):
        view = getattr(built[2], what).state_dict()
        alone = size(getattr(lone, what).state_dict())
        owned = own_storage(view)
        assert size(view) > 3 * alone  # a view saves the whole storage: four copies
        assert size(owned) < 1.1 * alone + 1024
        for key, value in (owned if what == "model" else owned["state"]).items():
            want = view[key] if what == "model" else view["state"][key]
            if isinstance(value, Tensor):
                assert torch.equal(value, want)
                assert value.untyped_storage().nbytes() == value.numel() * value.element_size()
            else:
                for name, t in value.items():
                    assert torch.equal(t, want[name])


# ---------------------------------------------------------- 7: what stacks, and what does not


def test_signature_refuses_layers_that_do_not_stack() -> None:
    head = [nn.Flatten(), nn.Linear(64, CLASSES)]
    refused = {
        "tanh": nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)),
        "layernorm": nn.Sequential(nn.Flatten(), nn.LayerNorm(64), nn.Linear(64, 10)),
        "linear before the flatten": nn.Sequential(nn.Linear(8, 8), *head),
        "conv after the flatten": nn.Sequential(
            nn.Flatten(), nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 1, 3), nn.Flatten()
        ),
        "batchnorm1d before the flatten": nn.Sequential(nn.BatchNorm1d(1), *head),
        "no flatten": nn.Sequential(nn.Linear(64, 10)),
        "two flattens": nn.Sequential(nn.Flatten(), nn.Flatten(), nn.Linear(64, 10)),
        "flatten from dim 0": nn.Sequential(nn.Flatten(0), nn.Linear(64, 10)),
        "dropout2d": nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Dropout2d(0.2), *head),
        "reflect padding": nn.Sequential(
            nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), *head
        ),
        "bn without affine": nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64, affine=False)),
        "bn without running stats": nn.Sequential(
            nn.Flatten(), nn.BatchNorm1d(64, track_running_stats=False)
        ),
        "not a sequential": nn.ModuleList([nn.Flatten(), nn.Linear(64, 10)]),
    }
    for what, model in refused.items():
        assert signature(model) is None, what
    assert signature(nn.Sequential(*head)) is not None


def test_signature_equal_for_copies_differing_in_dropout_and_bn_momentum() -> None:
    def sig(**kw: Any) -> tuple[str, ...] | None:
        common = {f"model.{k}": v for k, v in kw.items() if k != "dropout"}
        common["regularizer.dropout"] = kw.get("dropout", 0.2)
        return signature(build(config(common), 0).model)

    base = sig()
    assert base is not None
    assert sig(dropout=0.5, bn_momentum=None) == base
    assert sig(bn_momentum=0.01) == base
    assert sig(hidden=[32, 8]) != base
    assert sig(dropout=0.0) != base  # no dropout layer at all
    assert sig(bn=False) != base
    cnn = sig(name="cnn")
    assert cnn is not None and cnn != base and sig(name="cnn", bn_momentum=None) == cnn
    eps = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64, eps=1e-3))
    assert signature(eps) != signature(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64)))


def _refused(built: Sequence[Copy]) -> None:
    """``Stack`` raises ValueError, and leaves the copies' parameters their own."""
    with pytest.raises(ValueError):
        stack_of(built)
    for c in built:
        for p in c.model.parameters():
            assert p.untyped_storage().nbytes() == p.numel() * p.element_size()


def test_stack_refuses_optimizers_that_do_not_stack() -> None:
    def group(*nodes: dict[str, Any]) -> list[Copy]:
        return [build(config(n), j) for j, n in enumerate(nodes)]

    _refused(group({}, {"optimizer.name": "adam"}))
    _refused(group({"optimizer.name": "adam"}, {"optimizer.name": "adamw"}))
    _refused(group({"optimizer.nesterov": True}, {"optimizer.nesterov": False}))
    _refused(group({}, {"model.hidden": [32, 8]}))  # other shapes
    odd = group({}, {})
    odd[1].optimizer = torch.optim.SGD(odd[1].model.parameters(), lr=0.1, weight_decay=1e-4)
    _refused(odd)
    odd[1].optimizer = torch.optim.SGD(
        odd[1].model.parameters(), lr=0.1, momentum=0.9, dampening=0.1
    )
    _refused(odd)
    ams = group({"optimizer.name": "adam"}, {"optimizer.name": "adam"})
    ams[0].optimizer = torch.optim.Adam(ams[0].model.parameters(), amsgrad=True)
    _refused(ams)
    tanh = [
        Copy(m, torch.optim.SGD(m.parameters(), lr=0.1), Regularizer([]))
        for m in (nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh()) for _ in range(2))
    ]
    _refused(tanh)
    # Equal nesterov, different momenta and rates: stacks.
    stack_of(
        group({"optimizer.nesterov": True}, {"optimizer.nesterov": True, "optimizer.momentum": 0.5})
    )


# ---------------------------------------------------------------- 8: lanes are independent


@pytest.mark.parametrize(
    "case",
    [({}, SGD | L1_L2), ({"optimizer.name": "adam"}, ADAM | DROPOUT)],
    ids=["sgd", "adam-dropout"],
)
def test_drop_zeroes_one_lane_and_leaves_the_others_as_they_were(
    case: tuple[dict[str, Any], dict[str, Sequence[Any]]],
) -> None:
    cfgs = copies(*case)
    x, y = data()
    idx = batches(8)
    runs = []
    for drop in (None, 2):
        built = [build(c, j) for j, c in enumerate(cfgs)]
        stack = stack_of(built)
        stacked_steps(stack, x, y, idx[:4], lrs(built))
        rates = lrs(built)
        if drop is not None:
            stack.drop(drop)
            rates[drop] = 0.0  # as the lockstep loop trains an ended lane
            assert all(not p.any() for p in built[drop].model.parameters())
            state = built[drop].optimizer.state_dict()["state"]
            assert state and all(
                not t.any() for s in state.values() for n, t in s.items() if n != "step"
            )
        runs.append((stacked_steps(stack, x, y, idx[4:], rates), built))
    (kept, kept_built), (dropped, dropped_built) = runs
    for j in (0, 1, 3):
        torch.testing.assert_close(dropped[:, j], kept[:, j], rtol=1e-6, atol=0.0)
        for a, b in zip(
            kept_built[j].model.state_dict().values(),
            dropped_built[j].model.state_dict().values(),
            strict=True,
        ):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(dropped).all()
    assert all(not p.any() for p in dropped_built[2].model.parameters())  # rate 0: stays zero


def test_a_diverged_lane_poisons_no_other_and_drop_clears_it() -> None:
    cfgs = copies({}, SGD)
    x, y = data()
    idx = batches(6)
    runs = []
    for poison in (False, True):
        built = [build(c, j) for j, c in enumerate(cfgs)]
        stack = stack_of(built)
        stacked_steps(stack, x, y, idx[:2], lrs(built))
        if poison:
            with torch.no_grad():
                next(built[2].model.parameters()).fill_(float("nan"))
        rates = lrs(built)
        losses = [stacked_steps(stack, x, y, idx[2:3], rates)]
        if poison:
            assert not torch.isfinite(losses[0][:, 2]).any()
            stack.drop(2)
            rates[2] = 0.0
        losses.append(stacked_steps(stack, x, y, idx[3:], rates))
        runs.append((torch.cat(losses), built))
    (clean, _), (poisoned, built) = runs
    for j in (0, 1, 3):
        torch.testing.assert_close(poisoned[:, j], clean[:, j], rtol=1e-6, atol=0.0)
    assert torch.isfinite(poisoned[1:, 2]).all()  # after the drop: zeros, finite
    assert all(torch.isfinite(p).all() and not p.any() for p in built[2].model.parameters())


# -------------------------------------------------- accumulation windows, changing rates


@pytest.mark.parametrize(
    "case",
    [({}, SGD | DROPOUT), ({"optimizer.name": "adamw"}, ADAM | PENALTIES | L1_L2)],
    ids=["sgd-dropout", "adamw-penalties"],
)
def test_accumulation_windows_and_changing_rates_as_alone(
    case: tuple[dict[str, Any], dict[str, Sequence[Any]]],
) -> None:
    """Two micro-batches' gradients per step (as the lockstep loop accumulates them), the
    penalty on the last, and rates that change between steps (a schedule)."""
    cfgs = copies(*case)
    x, y = data()
    idx = batches(16).view(8, 2, 4, BATCH)  # [steps, micro-batches, G, B]
    scale = [1.0, 1.0, 0.5, 0.5, 0.25, 2.0, 2.0, 1.0]

    lone_losses = []
    for j, c in enumerate(cfgs):
        lone, losses = build(c, j), []
        base = lone.optimizer.param_groups[0]["lr"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(100 + j)
            for s, window in enumerate(idx[:, :, j]):
                total = 0.0
                for m, i in enumerate(window):
                    loss = (
                        F.cross_entropy(lone.model(x[i]), y[i], reduction="sum")
                        / idx[0, :, 0].numel()
                    )
                    if m == len(window) - 1 and lone.regularizer.adds_to_loss:
                        loss = loss + lone.regularizer.penalty()
                    loss.backward()
                    total += loss.item()
                lone.optimizer.param_groups[0]["lr"] = base * scale[s]
                lone.optimizer.step()
                lone.regularizer.after_step(base * scale[s])
                lone.optimizer.zero_grad(set_to_none=True)
                losses.append(total)
        lone_losses.append(losses)

    built = [build(c, j) for j, c in enumerate(cfgs)]
    stack, base = stack_of(built), lrs(built)
    stacked = []
    for s, window in enumerate(idx):
        total = torch.zeros(4)
        for m, i in enumerate(window):
            out = stack.forward(x[i])
            loss = F.cross_entropy(out.flatten(0, 1), y[i].flatten(), reduction="none")
            loss = loss.view(4, BATCH).sum(1) / idx[0, :, 0].numel()
            if m == len(window) - 1 and stack.adds_to_loss:
                loss = loss + stack.penalty()
            loss.sum().backward()
            total += loss.detach()
        stack.step([r * scale[s] for r in base])
        stacked.append(total)
    got = torch.stack(stacked)
    for j in range(4):
        err = close(got[:, j], lone_losses[j])
        assert err < 1e-4, (j, err)
    for c in built:
        assert all(int(b) == 16 for k, b in c.model.state_dict().items() if "batches" in k)


# --------------------------------------------------------------- a resumed group of copies


@pytest.mark.parametrize(
    "momenta",
    [(0.9, 0.0, 0.5, 0.9), (0.0, 0.9, 0.5, 0.9)],
    ids=["first-copy-with-momentum", "first-copy-without-momentum"],
)
def test_a_stack_of_resumed_copies_goes_on_as_the_unbroken_stack(
    momenta: tuple[float, ...],
) -> None:
    """Copies loaded from their checkpoints (optimizer state included) stack into the stack
    they were saved from: their momentum buffers are taken in, whichever copy has none."""
    cfgs = copies({}, SGD | {"optimizer.momentum": momenta})
    x, y = data()
    idx = batches(10)
    built = [build(c, j) for j, c in enumerate(cfgs)]
    stack = stack_of(built)
    stacked_steps(stack, x, y, idx[:5], lrs(built))
    saved = [(snapshot(c.model.state_dict()), snapshot(c.optimizer.state_dict())) for c in built]
    gens = [g.get_state() for g in stack.generators]
    unbroken = stacked_steps(stack, x, y, idx[5:], lrs(built))

    resumed = [build(c, 1000 + j) for j, c in enumerate(cfgs)]
    for c, (model_state, opt_state) in zip(resumed, saved, strict=True):
        c.model.load_state_dict(model_state)
        c.optimizer.load_state_dict(opt_state)
    again = stack_of(resumed)
    for g, state in zip(again.generators, gens, strict=True):
        g.set_state(state)
    err = close(stacked_steps(again, x, y, idx[5:], lrs(resumed)), unbroken)
    assert err < 1e-5, err


def test_global_random_stream_untouched_by_stacked_dropout() -> None:
    """Dropout in the stack draws from the copies' generators only."""
    built = [build(c, j) for j, c in enumerate(copies({}, SGD | DROPOUT))]
    stack = stack_of(built)
    x, y = data()
    before = torch.get_rng_state()
    stacked_steps(stack, x, y, batches(2), lrs(built))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_stacked_evaluation_equals_each_copys_own(name: str) -> None:
    """After some training (BN statistics of their own), one stacked pass in eval mode gives
    every copy the loss and accuracy ``loop.evaluate`` gives it alone, chunks included."""
    from mnistlab.engine.data import Split
    from mnistlab.engine.loop import evaluate

    cfgs = copies({"model.name": name}, SGD | DROPOUT)
    x, y = data()
    built = [build(c, j) for j, c in enumerate(cfgs)]
    stack = stack_of(built)
    stacked_steps(stack, x, y, batches(5), lrs(built))
    losses, accs = stack.evaluate(x, y, batch_size=37)  # chunks that do not divide the set
    for j, c in enumerate(built):
        alone = evaluate(c.model, Split(x, y), batch_size=1024)
        assert losses[j].item() == pytest.approx(alone["loss"], rel=1e-5)
        assert accs[j].item() == pytest.approx(alone["acc"], abs=1e-9)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_a_stacked_bn_pass_gives_each_copy_its_exact_statistics(name: str) -> None:
    """The tap on the stack's eval-mode BatchNorm hands each copy's BN inputs, as the copy
    alone sees them, to its own accumulators: each copy's statistics equal
    ``mnistlab.bn.stats.exact_stats`` of the copy alone, each over its own samples."""
    from mnistlab.bn.stats import Accumulators, exact_stats
    from mnistlab.engine.models import bn_layers

    cfgs = copies({"model.name": name}, SGD | DROPOUT)
    x, y = data()
    built = [build(c, j) for j, c in enumerate(cfgs)]
    stack = stack_of(built)
    stacked_steps(stack, x, y, batches(5), lrs(built))
    own = torch.stack([x[torch.randperm(len(x), generator=torch.Generator().manual_seed(j))]
                       for j in range(4)])[:, :100]  # fmt: skip
    layers = {n: m.num_features for n, m in bn_layers(stack.first).items()}
    accs = [Accumulators(layers, 16) for _ in built]
    stack.tap = lambda layer, xs: [a.add(layer, t) for a, t in zip(accs, xs, strict=True)]
    with torch.inference_mode():
        for start in range(0, 100, 48):  # chunks of 3 batches: a tail in the last one
            stack.forward(own[:, start : start + 48], training=False)
    stack.tap = None
    for j, c in enumerate(built):
        lone = exact_stats(c.model, own[j], None, batch_size=16, chunk_size=48)
        got = accs[j].result(torch.device("cpu"))
        assert got.keys() == lone.keys() == layers.keys()
        for layer, stats in lone.items():
            for part in ("data", "batch_mean", "batch_var"):
                for a, b in zip(getattr(got[layer], part), getattr(stats, part), strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
