"""Smoke test of ``scripts/bench.py --quick``: it runs every row and prints each one.

No timed assertions: the numbers depend on the machine; only their presence is checked.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT, child_env

BENCH = ROOT / "scripts" / "bench.py"


def bench_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


# The rows in two halves, run side by side by two bench processes (``--only``): each half is
# mostly one process at a time, so the two keep both cores busy. Together: every row function.
HALVES = (
    ["row_machine", "row_gemm", "row_throughput_mlp", "row_throughput_cnn", "row_flops",
     "row_overheads_default", "row_overheads_mnist", "row_startup", "row_stacked_steps",
     "row_stacked_digits", "row_stacked_mnist"],
    ["row_sweep", "row_threads", "row_load", "row_bn_points", "row_cuda"],
)  # fmt: skip


@pytest.mark.slow
def test_quick_bench_prints_every_row(tmp_path: Path) -> None:
    mod = bench_module()
    assert sorted(n for half in HALVES for n in half) == sorted(f.__name__ for f in mod.ROWS)
    env = child_env(OMP_NUM_THREADS="1")
    procs = []
    for i, half in enumerate(HALVES):
        args = [sys.executable, str(BENCH), "--quick", "--threads", "1", "--only", *half]
        args += ["--markdown", str(tmp_path / f"rows{i}.md")]
        args += ["--data", str(tmp_path / "no-data")]  # generated IDX files
        procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=ROOT, env=env))  # fmt: skip
    outs = [p.communicate(timeout=280) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
        assert "failed:" not in out
    stdout = "".join(out for out, _ in outs)
    printed = {line.split()[0] for line in stdout.splitlines() if line.strip()}
    missing = [n for n in mod.ROW_NAMES if n not in printed]
    assert not missing, stdout
    table = "".join((tmp_path / f"rows{i}.md").read_text() for i in range(len(HALVES)))
    for n in mod.ROW_NAMES:
        assert f"| {n} |" in table


def test_flop_count_of_an_mlp_training_step() -> None:
    """Forward 2 FLOPs per weight and sample; backward 4, except the first layer's 2 (no
    gradient for the input): 784-128-64-10 does 2*W + 4*W - 2*784*128 per sample."""
    from mnistlab.config import ModelConfig
    from mnistlab.engine import models

    net = models.build(ModelConfig(), (1, 28, 28), 10, 0.0)
    weights = 784 * 128 + 128 * 64 + 64 * 10
    got = bench_module().train_flops_per_sample(net, (1, 28, 28), 32)
    assert got == 6 * weights - 2 * 784 * 128
    assert all(p.grad is None for p in net.parameters())  # the count leaves no gradients
