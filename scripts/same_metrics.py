#!/usr/bin/env python
"""Prove that a change trained nothing differently: ``metrics.jsonl`` byte for byte.

Checks out ``--base`` (a commit before the change) into a temporary git worktree, runs the
same commands there and in this checkout on CPU with the same seed, one after another (two
runs side by side would change nothing but the time), and compares every run's
``metrics.jsonl`` byte for byte. A refactor must pass it; a change of behaviour must not.

Usage::

    python scripts/same_metrics.py --base a3a7176            # the four standard runs
    python scripts/same_metrics.py --base HEAD~3 --only accum l1
    python scripts/same_metrics.py --base v1 --extra trainer.epochs=2   # shorter runs

Exit code 0 when every pair is identical, 1 otherwise (the first differing line is shown).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The standard runs: the default job, gradient accumulation on a subset, proximal L1, two
# spawned gloo ranks, and a 4-job stacked sweep (its jobs' metrics.jsonl, in job order).
RUNS = {
    "default": [],
    "accum": ["trainer.grad_accum=3", "dataset.limit_train=1000"],
    "l1": ["regularizer=l1"],
    "ddp": ["trainer.devices=2"],
    "stacked": ["-m", "hydra/launcher=stacked", "trainer.seed=0,1", "optimizer.lr=0.02,0.05"],
}


def run(tree: Path, out: Path, overrides: list[str]) -> bytes:
    """One training run (or, with ``-m``, one sweep) of the code in ``tree``; returns its
    ``metrics.jsonl`` (a sweep's jobs' files one after another, in job order)."""
    env = dict(
        os.environ,
        PYTHONPATH=str(tree / "src"),  # the tree's own package, ahead of the editable install
        CUDA_VISIBLE_DEVICES="",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
    )
    sweep = "-m" in overrides
    where = ["-m", f"hydra.sweep.dir={out}"] if sweep else [f"hydra.run.dir={out}"]
    overrides = [o for o in overrides if o != "-m"]  # Hydra's flag goes first
    cmd = [sys.executable, "-m", "mnistlab.train", *where, "logger=none"]
    # A fixed thread count: trainer.num_threads=auto follows the machine's load, and a thread
    # count changes float summation order. 2 is what auto picks on an idle 2-core machine.
    cmd += ["trainer.accelerator=cpu", "trainer.progress=none", "trainer.num_threads=2"]
    cmd += overrides
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(overrides)} failed:\n{p.stderr[-3000:]}")
    if not sweep:
        return (out / "metrics.jsonl").read_bytes()
    jobs = sorted((d for d in out.iterdir() if d.name.isdigit()), key=lambda d: int(d.name))
    return b"".join((d / "metrics.jsonl").read_bytes() for d in jobs)


def first_difference(a: bytes, b: bytes) -> str:
    la, lb = a.splitlines(), b.splitlines()
    for i, (x, y) in enumerate(zip(la, lb, strict=False)):
        if x != y:
            return f"line {i + 1}:\n  base: {x.decode()[:300]}\n  here: {y.decode()[:300]}"
    return f"{len(la)} lines in base, {len(lb)} here"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the commit before the change")
    p.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="same-metrics-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base), args.base],
            cwd=REPO, check=True, capture_output=True,
        )  # fmt: skip
        try:
            failed = 0
            for name in args.only:
                overrides = [*RUNS[name], *args.extra]
                a = run(base, Path(tmp) / f"{name}-base", overrides)
                b = run(REPO, Path(tmp) / f"{name}-here", overrides)
                same = a == b
                failed += not same
                rows = a.count(b"\n")
                print(f"{name:8} {'identical' if same else 'DIFFERENT'}  ({rows} rows, "
                      f"{len(a)} bytes)  {' '.join(overrides) or '(defaults)'}")  # fmt: skip
                if not same:
                    print(first_difference(a, b))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
