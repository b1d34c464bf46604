"""Smoke test of ``scripts/bench.py --quick``: it runs every row and prints each one.

No timed assertions: the numbers depend on the machine; only their presence is checked.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT

BENCH = ROOT / "scripts" / "bench.py"


def bench_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quick_bench_prints_every_row(tmp_path: Path) -> None:
    md = tmp_path / "rows.md"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", WANDB_SILENT="true")
    args = [sys.executable, str(BENCH), "--quick", "--threads", "1", "--markdown", str(md)]
    args += ["--data", str(tmp_path / "no-data")]  # generated IDX files
    p = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=280)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    names = bench_module().ROW_NAMES
    printed = {line.split()[0] for line in p.stdout.splitlines() if line.strip()}
    missing = [n for n in names if n not in printed]
    assert not missing, p.stdout
    table = md.read_text()
    for n in names:
        assert f"| {n} |" in table
    assert "failed:" not in p.stdout


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
