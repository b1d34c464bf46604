"""BatchNorm running statistics: exact pass, Chan merge, gap metrics, EMA theory, PreciseBN."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from mnistlab.bn import monitor as bn_monitor
from mnistlab.bn.gaps import GAP_KEYS, gap_metrics
from mnistlab.bn.monitor import Monitor
from mnistlab.bn.precise import recalibrate
from mnistlab.bn.stats import LayerStats, Moments, chan_merge, exact_stats, merge_across_ranks
from mnistlab.bn.theory import folded_mean, init_weight, noise_factor
from mnistlab.engine.models import bn_layers
from mnistlab.engine.steps import Cadence

from support import ROOT, TorchThreads, app, png_size, read_jsonl, read_summary


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one torch thread each test (see ``support.TorchThreads``)."""
    with TorchThreads(1):
        yield


def _model(momentum: float | None = 0.1) -> nn.Sequential:
    """Conv -> BN2d -> ReLU -> Flatten -> Linear -> BN1d -> ReLU -> Linear, on 1x6x6 inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4, momentum=momentum),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8),
        nn.BatchNorm1d(8, momentum=momentum),
        nn.ReLU(),
        nn.Linear(8, 3),
    )
    with torch.no_grad():  # running stats and affine far from trivial: eval mode must matter
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _data(n: int = 203, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g) * 1.7 + 0.8


def _brute_force(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every BN input captured in one eval forward over all of x, reduced at once in float64."""
    captured: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, inp, n=n: captured.__setitem__(n, inp[0]))
        for n, m in bn_layers(model).items()
    ]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    out = {}
    for n, v in captured.items():
        v = v.double()
        dims = (0, *range(2, v.dim()))
        out[n] = (v.mean(dims), v.var(dims, correction=1))
    return out


def _assert_close(stats: LayerStats, mean: torch.Tensor, var: torch.Tensor) -> None:
    std = var.sqrt()
    assert torch.all((stats.data.mean - mean).abs() <= 1e-6 * std)
    assert torch.allclose(stats.data.var, var, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("batch_size", "chunk_size"), [(16, 50), (7, 1024), (1, 13), (300, 64)])
def test_exact_stats_equal_brute_force(batch_size: int, chunk_size: int) -> None:
    """1d and 2d layers; 203 samples leave uneven last chunks and sub-batches."""
    model, x = _model(), _data()
    model.train()
    stats = exact_stats(model, x, batch_size=batch_size, chunk_size=chunk_size)
    assert model.training  # the mode it found is restored
    ref = _brute_force(model, x)
    assert list(stats) == ["1", "5"]
    for name, (mean, var) in ref.items():
        _assert_close(stats[name], mean, var)
        assert int(stats[name].data.count) == 203 * (36 if name == "1" else 1)


def test_exact_stats_of_a_probe_subset() -> None:
    model, x = _model(), _data()
    index = torch.randperm(203, generator=torch.Generator().manual_seed(3))[:77]
    stats = exact_stats(model, x, index, batch_size=8, chunk_size=30)
    for name, (mean, var) in _brute_force(model, x[index]).items():
        _assert_close(stats[name], mean, var)


def test_per_batch_spread_is_measured_on_sub_batches_of_the_training_batch_size() -> None:
    model, x = _model(), _data()
    b = 10
    stats = exact_stats(model, x, batch_size=b, chunk_size=45)  # chunks of 40: 5 full + 3
    captured = _brute_force(model, x)  # only to get names; recompute sub-batches directly
    inputs: dict[str, torch.Tensor] = {}
    hs = [
        m.register_forward_pre_hook(lambda mod, inp, n=n: inputs.__setitem__(n, inp[0].double()))
        for n, m in bn_layers(model).items()
    ]
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in captured}
    with torch.no_grad():
        for start in range(0, 203, 40):
            model(x[start : start + 40])
            for n, v in inputs.items():
                parts[n] += [v[i : i + b] for i in range(0, len(v) - b + 1, b)]
    for h in hs:
        h.remove()
    for n, subs in parts.items():
        dims = (0, *range(2, subs[0].dim()))
        means = torch.stack([s.mean(dims) for s in subs])
        vars_ = torch.stack([s.var(dims, correction=1) for s in subs])
        assert int(stats[n].batch_mean.count) == len(subs) == 20
        assert torch.allclose(stats[n].batch_mean.mean, means.mean(0), rtol=1e-6, atol=1e-9)
        assert torch.allclose(stats[n].batch_mean.var, means.var(0), rtol=1e-5)
        assert torch.allclose(stats[n].batch_var.mean, vars_.mean(0), rtol=1e-6)


def test_chan_merge_equals_one_pass_over_uneven_splits() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1000, 5, generator=g, dtype=torch.float64) * 3 + 100
    whole = Moments.of(v, 0)
    merged = Moments.empty(5)
    for lo, hi in [(0, 1), (1, 2), (2, 333), (333, 334), (334, 1000)]:
        merged = chan_merge(merged, Moments.of(v[lo:hi], 0))
    assert float(merged.count) == 1000
    assert torch.allclose(merged.mean, whole.mean, rtol=1e-12)
    assert torch.allclose(merged.m2, whole.m2, rtol=1e-10)
    assert torch.allclose(merged.var, v.var(0), rtol=1e-10)
    assert chan_merge(Moments.empty(5), Moments.empty(5)).count == 0


def test_merge_across_ranks_is_the_identity_in_one_process() -> None:
    stats = exact_stats(_model(), _data(), batch_size=8)
    assert merge_across_ranks(stats) is stats


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    torch.set_num_threads(1)
    model, x = _model(), _data()
    index = torch.arange(203)[rank::world]  # each rank passes its own share
    stats = exact_stats(model, x, index, batch_size=8, chunk_size=40)
    if rank == 0:
        torch.save({n: (s.data.mean, s.data.var, s.data.count) for n, s in stats.items()}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_merge_across_ranks_with_two_gloo_processes(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "stats.pt")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_main, args=(2, port, out), nprocs=2, join=True)
    got = torch.load(out)
    for name, (mean, var) in _brute_force(_model(), _data()).items():
        g_mean, g_var, g_count = got[name]
        assert int(g_count) == 203 * (36 if name == "1" else 1)
        assert torch.all((g_mean - mean).abs() <= 1e-6 * var.sqrt())
        assert torch.allclose(g_var, var, rtol=1e-6)


# ----------------------------------------------------------------------------- EMA theory


def test_theory_formulas() -> None:
    assert init_weight(0.001, 2000) == pytest.approx(0.999**2000)
    assert init_weight(0.001, 2000) == pytest.approx(0.1352, abs=1e-4)
    assert init_weight(None, 0) == 1.0 and init_weight(None, 5) == 0.0
    assert noise_factor(0.1, 10**6) == pytest.approx(0.1 / 1.9)
    assert noise_factor(1.0, 7) == pytest.approx(1.0)  # only the last batch counts
    assert noise_factor(None, 50) == pytest.approx(1 / 50)
    # sum of squared EMA weights, computed directly
    m, t = 0.2, 9
    assert noise_factor(m, t) == pytest.approx(sum((m * (1 - m) ** k) ** 2 for k in range(t)))
    mu, sd = torch.tensor([0.0, 1.0, -2.0, 3.0]), torch.tensor([1.0, 0.5, 0.0, 2.0])
    samples = torch.randn(
        400_000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    mc = (samples * sd + mu).abs().mean(0)
    assert torch.allclose(folded_mean(mu, sd), mc, rtol=5e-3)


def _frozen_ema_run(
    seed: int, momentum: float | None, b: int, t: int, probe: int | None = None
) -> dict[str, dict]:
    """A frozen random network fed t random batches in train mode, then measured."""
    g = torch.Generator().manual_seed(1000 + seed)
    torch.manual_seed(seed)
    n = 4000
    x = torch.randn(n, 20, generator=g) * 2 + 1.5
    model = nn.Sequential(
        nn.Linear(20, 64),
        nn.BatchNorm1d(64, momentum=momentum),
        nn.ReLU(),
        nn.Linear(64, 48),
        nn.BatchNorm1d(48, momentum=momentum),
        nn.ReLU(),
        nn.Linear(48, 3),
    ).requires_grad_(False)
    with torch.no_grad():
        for _ in range(t):
            model(x[torch.randperm(n, generator=g)[:b]])
    mon = Monitor(model, x, batch_size=b, cadence=Cadence.of(t), probe_samples=probe, seed=seed)
    return mon.measure()


@pytest.mark.parametrize(
    ("momentum", "b", "t", "layers", "probe"),
    [
        (0.1, 16, 30, ("1", "4"), None),  # initial weight 0.04 still visible
        (0.1, 16, 300, ("1", "4"), None),  # pure noise
        (0.01, 32, 100, ("1",), None),  # initial bias dominates (weight 0.37)
        (0.3, 8, 40, ("1", "4"), None),
        (None, 16, 50, ("1",), None),  # cumulative average
        (0.1, 16, 300, ("1", "4"), 400),  # a probe's own sampling error adds to the gap
    ],
)
def test_monte_carlo_gap_matches_theory(
    momentum: float | None, b: int, t: int, layers: tuple[str, ...], probe: int | None
) -> None:
    """Measured |gap| and |log var ratio| within 20% of the prediction, over 8 seeds."""
    runs = [_frozen_ema_run(seed, momentum, b, t, probe) for seed in range(8)]
    for layer in layers:
        for meas, pred in (
            ("mean_gap_mean", "pred_mean_gap_mean"),
            ("logvar_ratio_mean", "pred_logvar_ratio_mean"),
        ):
            measured = sum(r[layer][meas] for r in runs) / len(runs)
            predicted = sum(r[layer][pred] for r in runs) / len(runs)
            assert measured == pytest.approx(predicted, rel=0.2), (layer, meas)
        assert runs[0][layer]["num_batches_tracked"] == t


# ----------------------------------------------------------------------------- PreciseBN, Monitor


def _trained(momentum: float | None = 0.1) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """A model trained a few SGD steps, so its running statistics lag the weights."""
    model, x = _model(momentum), _data(400)
    y = (x.mean((1, 2, 3)) > 0.8).long() + (x[:, 0, 0, 0] > 1).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for i in range(12):
        idx = slice(32 * i, 32 * i + 32)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
    return model, x, y


@pytest.mark.parametrize("momentum", [0.1, None])
def test_recalibration_closes_every_gap(momentum: float | None) -> None:
    model, x, _ = _trained(momentum)
    before = gap_metrics(model, exact_stats(model, x, batch_size=32))
    assert max(v["mean_gap_mean"] for v in before.values()) > 1e-2
    recalibrate(model, x, batch_size=32, chunk_size=100)
    after = gap_metrics(model, exact_stats(model, x, batch_size=32))
    for v in after.values():
        assert v["mean_gap_max"] < 1e-5
        assert v["logvar_ratio_max"] < 1e-5
        assert v["num_batches_tracked"] == 12  # recalibration is not an update


def test_monitor_finish_recalibrates_and_reports_accuracy_before_and_after() -> None:
    model, x, y = _trained()

    def acc() -> float:
        model.eval()
        with torch.no_grad():
            out = float((model(x).argmax(1) == y).double().mean())
        model.train()
        return out

    mon = Monitor(model, x, batch_size=32, cadence=Cadence.of(12, bn=4))
    row, part = mon.finish(
        micro_batches=12, optimizer_steps=12, recalibrate_stats=True, evaluate=acc
    )
    assert row["bn/test_acc_after_recal"] == pytest.approx(acc())
    assert row["bn/test_acc_recal_delta"] == pytest.approx(
        row["bn/test_acc_after_recal"] - row["bn/test_acc_before_recal"]
    )
    assert row["bn/gap_max_after_recal"] < 1e-5
    assert part["final"]["bn/gap_mean"] > 1e-2  # the EMA's gap before the repair
    assert part["bn"]["5"]["after_recal"]["mean_gap_max"] < 1e-5
    assert part["bn_updates_equal_micro_batches"] is True
    assert part["bn_updates"]["num_batches_tracked"] == {"1": 12, "5": 12}


def test_monitor_cadence_and_no_side_effects() -> None:
    model, x, _ = _trained()
    mon = Monitor(model, x, batch_size=32, cadence=Cadence.of(50), probe_samples=100, seed=3)
    assert mon.cadence.bn_every == 2  # about 20 points: 50 // 20
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    model.train()
    assert mon.on_step(3) is None
    row = mon.on_step(4)
    assert row is not None and mon.on_step(50) is not None  # cadence, and always the last step
    assert set(row) >= {f"bn/1/{k}" for k in GAP_KEYS} | {"bn/gap_mean", "bn/gap_max"}
    assert row["bn/5/num_batches_tracked"] == 12
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    assert len(mon.index["final"]) == len(mon.index["periodic"]) == 100 and mon.seconds > 0
    # one seed, one probe: the rows repeat exactly
    again = Monitor(model, x, batch_size=32, cadence=Cadence.of(50), probe_samples=100, seed=3)
    assert again.on_step(4) == row


def test_monitor_without_bn_layers_is_silent() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    mon = Monitor(model, _data(), batch_size=8, cadence=Cadence.of(10))
    assert mon.on_step(10) is None
    assert mon.finish(10, 10) == ({}, {})


# ----------------------------------------------------------------------------- the demo


def _demo():
    spec = importlib.util.spec_from_file_location("ema_demo", ROOT / "scripts" / "ema_demo.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ema_demo"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_ema_demo_reproduces_the_textbook_numbers(tmp_path: Path, capsys) -> None:
    demo = _demo()
    assert demo.main(["--repeats", "100", "--json", str(tmp_path / "d.json")]) == 0
    text = capsys.readouterr().out
    res = json.loads((tmp_path / "d.json").read_text())
    assert res["updates"] == 2000
    assert res["weight_newest_wrong"] == pytest.approx(0.999)
    assert res["init_weight"] == pytest.approx(0.1352, abs=1e-4)
    assert "0.999" in text and "0.135" in text
    # the slip tracks the last batch; the right EMA equals BatchNorm1d's running mean
    assert abs(res["wrong_ema"] - res["last_batch_mean"]) < 0.01
    assert res["ema"] == pytest.approx(res["bn_running_mean"], abs=1e-5)
    assert res["bn_num_batches_tracked"] == 2000
    assert res["ema_corrected"] == pytest.approx(res["ema"] / (1 - 0.999**2000))
    for row in res["grid"]:
        assert row["ratio"] == pytest.approx(1.0, abs=0.2)
    # the same draws shifted by 1: the EMA gains (1 - w0) * 1, its initial bias shows; the
    # bias-corrected one gains exactly 1; BatchNorm1d agrees
    shifted, w0 = res["shifted"], res["init_weight"]
    assert shifted["true_mean"] == pytest.approx(res["true_mean"] + 1)
    assert shifted["ema"] - res["ema"] == pytest.approx(1 - w0, abs=1e-12)
    assert shifted["ema_corrected"] - res["ema_corrected"] == pytest.approx(1, abs=1e-12)
    assert shifted["bn_running_mean"] == pytest.approx(shifted["ema"], abs=1e-5)
    assert f"PyTorch ema {shifted['ema']:.4f} (expects (1 - 0.135) * 1 = 0.8648)" in text


def test_ema_demo_plot_is_a_png(tmp_path: Path, capsys) -> None:
    demo = _demo()
    out = tmp_path / "ema.png"
    assert demo.main(["--repeats", "20", "--plot", str(out)]) == 0
    width, height = png_size(out)
    assert width > 1000 and height > 400
    assert "plot written to" in capsys.readouterr().out


# ----------------------------------------------------------------------------- end to end


def _bn_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "bn/gap_mean" in r]


@pytest.mark.slow
def test_default_run_logs_bn_gaps_and_summary(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    overrides = ("trainer.epochs=3", "trainer.progress=none", "trainer.num_threads=1")
    for run_dir in (a, b):
        proc = app(run_dir, *overrides)
        assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _bn_rows(a)
    s = read_summary(a)
    total = s["plan"]["total_steps"]
    steps = [r["optimizer_step"] for r in rows]
    # about 20 points, thinned to what the budget affords: every k-th, each over the whole set
    every = steps[0] if len(steps) > 1 else total
    assert steps == [*range(every, total, every), total]
    assert every == total or every % (total // 20) == 0
    assert {r["bn/probe_samples"] for r in rows} == {s["plan"]["num_samples"]}
    assert {r["bn/probe_noise_share"] for r in rows} == {0.0}
    assert set(s["bn"]) == {"2", "5"}  # the MLP's two BatchNorm1d layers
    for name, vals in s["bn"].items():
        assert vals["num_batches_tracked"] == s["counted"]["total_micro_batches"]
        assert vals["mean_gap_mean"] == rows[-1][f"bn/{name}/mean_gap_mean"]
        assert 0 < vals["pred_mean_gap_mean"] < 1
    assert s["final"]["bn/gap_mean"] == rows[-1]["bn/gap_mean"]
    assert s["bn_updates_equal_micro_batches"] is True
    assert 0 < s["timings"]["bn_stats_s"] < s["timings"]["train_s"]
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()  # deterministic


@pytest.mark.slow
def test_recalibrate_and_grad_accum_end_to_end(tmp_path: Path) -> None:
    proc = app(
        tmp_path,
        "trainer.epochs=2",
        "trainer.grad_accum=3",
        "bn_stats.recalibrate=true",
        "bn_stats.every_n_steps=5",
        "bn_stats.probe_samples=500",
        "trainer.progress=none",
        "trainer.num_threads=1",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = read_summary(tmp_path)
    f = s["final"]
    assert f["bn/test_acc_after_recal"] == pytest.approx(f["test/acc"])
    assert f["bn/test_acc_recal_delta"] == pytest.approx(
        f["bn/test_acc_after_recal"] - f["bn/test_acc_before_recal"]
    )
    assert f["bn/gap_max_after_recal"] < 1e-5
    micro, steps = s["counted"]["total_micro_batches"], s["counted"]["total_steps"]
    assert micro > steps  # accumulation: BN counts micro-batches, not optimizer steps
    assert s["bn_updates"]["num_batches_tracked"] == {"2": micro, "5": micro}
    assert s["bn_updates_equal_micro_batches"] is True
    assert "micro-batch" in s["bn_updates"]["note"]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert any("bn/test_acc_before_recal" in r for r in rows)
    assert [r["optimizer_step"] for r in rows if "bn/gap_mean" in r][:2] == [5, 10]
    assert not math.isnan(f["bn/gap_mean"])


def test_default_points_measure_the_whole_set_as_views_of_the_data() -> None:
    model, x, _ = _trained()
    mon = Monitor(model, x, batch_size=32, cadence=Cadence.of(40, bn=10))
    assert mon.sizes == {"periodic": 400, "final": 400} and mon.every == 10
    seen, index, order = mon.probe("periodic")
    assert seen is x and index is None and torch.equal(order, mon.perm)  # no gather
    assert mon.probe_noise("periodic") == mon.noise_share("periodic") == 0.0
    periodic = mon.on_step(10)
    assert periodic is not None
    assert periodic["bn/probe_samples"] == 400 and periodic["bn/probe_noise_share"] == 0.0
    exact = gap_metrics(model, exact_stats(model, x, batch_size=32))
    assert periodic["bn/5/mean_gap_mean"] == pytest.approx(exact["5"]["mean_gap_mean"], rel=1e-6)
    # the sub-batches are random batches of the seeded permutation, as a gathered pass's
    gathered = exact_stats(model, x, mon.perm, batch_size=32)
    viewed = exact_stats(model, x, batch_size=32, sub_batch_order=mon.perm)
    for n, s in gathered.items():
        assert torch.allclose(viewed[n].batch_mean.var, s.batch_mean.var, rtol=1e-6)
        assert torch.allclose(viewed[n].batch_var.mean, s.batch_var.mean, rtol=1e-6)
    # the initial bias is (1 - m)^t |mu_0 - mu|: ~0 after 12 updates at m = 0.1 is 0.28 of it
    w0 = exact["5"]["pred_init_weight"]
    assert w0 == pytest.approx(0.9**12)
    final = mon.on_step(40)
    assert final is not None and mon.last_step == 40  # finish() reuses it


def test_the_budget_shrinks_the_probe_to_the_noise_floor_or_thins_the_points() -> None:
    model, x, _ = _trained()
    cadence = Cadence.of(400, bn=20)  # 19 mid-run points
    cheap = Monitor(model, x, batch_size=32, cadence=cadence, train_samples=10**7)
    assert cheap.sizes["periodic"] == 400 and cheap.every == 20
    # training as long as one pass: the budget cannot afford 19 whole-set points
    kept = Monitor(model, x, batch_size=32, cadence=cadence, train_samples=12_800)
    floor = kept.noise_floor(12_800, 19)
    assert kept.every == 20 and floor <= kept.sizes["periodic"] < 400
    b, n, p = 32, 400, kept.sizes["periodic"]
    assert kept.probe_noise("periodic") == pytest.approx(b / p * (n - p) / (n - 1))
    # at the first point (20 updates) the probe's own noise is at most 10% of the EMA's
    assert kept.probe_noise("periodic") / noise_factor(0.1, 20) <= bn_monitor.NOISE_SHARE
    row = kept.on_step(20)  # the share as it stands (this model has seen 12 updates)
    assert row is not None and row["bn/probe_noise_share"] == pytest.approx(
        kept.probe_noise("periodic") / noise_factor(0.1, 12)
    )
    thinned = Monitor(model, x, batch_size=32, cadence=cadence, train_samples=12_800, thin=True)
    assert thinned.sizes["periodic"] == 400 or thinned.sizes["periodic"] >= floor
    assert thinned.every is None or thinned.every % 20 == 0
    # an explicit probe is used as asked, its noise share reported
    explicit = Monitor(model, x, batch_size=32, cadence=cadence, probe_samples=100)
    row = explicit.on_step(20)
    assert row is not None and row["bn/probe_samples"] == 100
    assert row["bn/probe_noise_share"] > bn_monitor.NOISE_SHARE


def _ratios(lr: float, momentum: float) -> list[float]:
    """Mid-run measured / predicted mean gap of one BN layer, SGD at rate ``lr``."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 10, generator=g) * 1.5 + 0.5
    y = (x[:, 0] + x[:, 1] > 0.5).long()
    model = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32, momentum=momentum), nn.ReLU(),
                          nn.Linear(32, 2))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    steps, b = 400, 16
    mon = Monitor(model, x, batch_size=b, cadence=Cadence.of(steps, bn=10))
    out = []
    for step in range(1, steps + 1):
        i = torch.randint(0, 512, (b,), generator=g)
        nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
        opt.zero_grad()
        row = mon.on_step(step)
        if row is not None and step < steps:
            out.append(row["bn/1/gap_vs_pred"])
    return out


def test_mid_run_ratio_shows_planted_drift_and_stays_near_one_when_stationary() -> None:
    """The whole-set points test the theory: weights that outrun a slow EMA (a large rate,
    momentum 0.01) read well above 1; frozen weights (rate 0) read about 1."""
    drift = _ratios(lr=2.0, momentum=0.01)
    still = _ratios(lr=0.0, momentum=0.01)  # the same slow EMA, stationary input
    late = slice(len(drift) // 2, None)  # after the initial bias has faded
    assert sum(drift[late]) / len(drift[late]) > 1.5, drift
    assert 0.75 < sum(still) / len(still) < 1.3, still
    assert 0.75 < sum(still[late]) / len(still[late]) < 1.3, still


def test_console_lines_keep_bn_aggregates_only(caplog: pytest.LogCaptureFixture) -> None:
    from mnistlab.logger.sinks import ConsoleSink

    sink = ConsoleSink(total_steps=10, mode="lines")
    row = {"optimizer_step": 10, "bn/gap_mean": 0.5, "bn/2/mean_gap_mean": 0.25, "test/acc": 0.9}
    with caplog.at_level("INFO", logger="mnistlab"):
        sink.log(row, "eval")
    assert "bn/gap_mean=0.5" in caplog.text and "test/acc=0.9" in caplog.text
    assert "bn/2/" not in caplog.text


def test_wrapped_models_are_measured_through_their_inner_module() -> None:
    model, x = _model(), _data()
    plain = exact_stats(model, x, batch_size=8)
    wrapped = exact_stats(nn.DataParallel(model), x, batch_size=8)  # has .module, like DDP
    assert list(wrapped) == ["1", "5"]
    for n in plain:
        assert torch.equal(plain[n].data.mean, wrapped[n].data.mean)
