#!/usr/bin/env python
"""mnistlab's benchmark: every performance figure quoted in the repo comes from this script.

One process measures, side by side, on MNIST-format data (the real IDX files in ``--data``
when present, else generated IDX files of the same shape, read by torchvision's own class):

* our training loop against a pytorch/examples ``mnist/main.py``-style loop (torchvision
  MNIST, per-sample ``ToTensor``/``Normalize``, ``DataLoader`` batch 64, same model, same
  optimizer, same threads);
* the machine's float32 GEMM rate, and the training FLOP/s of MLPs at batch 512 as a
  fraction of it;
* overheads as shares of training time (exact BN statistics, W&B offline, evaluation);
* start-up to the first optimizer step, a 10-job ``-m`` sweep, and thread counts;
* a 16-job sweep trained by ``hydra/launcher=stacked`` against Hydra's basic launcher.

Usage::

    python scripts/bench.py                  # full run (a few minutes on 2 cores)
    python scripts/bench.py --quick          # small sample counts (the smoke test's)
    python scripts/bench.py --device cuda    # the GPU path (scripts/gpu_check.sh)
    python scripts/bench.py --markdown docs/bench_rows.md   # also write the markdown table

Rows are a list of functions (``ROWS``); a row whose feature is missing from this build
prints ``n/a (not available in this build)`` instead of failing. The row functions live in
``scripts/benchkit/``, by theme: ``speed`` (machine, GEMM, throughput, FLOP/s),
``overheads`` (shares of training time), ``processes`` (start-up, sweep, threads),
``stacked`` (the stacked launcher against the basic one) and ``gpu`` (CUDA); ``common``,
``runs`` and ``loops`` hold what they share.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
# This checkout's package first, and benchkit beside this file (also when loaded by path).
sys.path[:0] = [str(SCRIPTS.parent / "src"), str(SCRIPTS)]

from benchkit.common import Bench, Row, console_line, markdown  # noqa: E402
from benchkit.gpu import row_cuda  # noqa: E402
from benchkit.loops import train_flops_per_sample  # noqa: E402
from benchkit.overheads import (  # noqa: E402
    row_bn_points,
    row_overheads_default,
    row_overheads_mnist,
)
from benchkit.processes import row_load, row_startup, row_sweep, row_threads  # noqa: E402
from benchkit.runs import write_idx  # noqa: E402
from benchkit.speed import (  # noqa: E402
    row_flops,
    row_gemm,
    row_machine,
    row_throughput_cnn,
    row_throughput_mlp,
)
from benchkit.stacked import (  # noqa: E402
    row_stacked_digits,
    row_stacked_mnist,
    row_stacked_steps,
)

from mnistlab.processes.threads import resolve_threads  # noqa: E402

__all__ = ["ROWS", "ROW_NAMES", "main", "train_flops_per_sample"]

ROWS: list[Callable[[Bench], list[Row]]] = [
    row_machine,
    row_gemm,
    row_throughput_mlp,
    row_throughput_cnn,
    row_flops,
    row_overheads_default,
    row_overheads_mnist,
    row_bn_points,
    row_startup,
    row_sweep,
    row_stacked_steps,
    row_stacked_digits,
    row_stacked_mnist,
    row_threads,
    row_load,
    row_cuda,
]

# Every row name the CPU bench prints (the smoke test checks each one).
ROW_NAMES = [
    "machine",
    "gemm_fp32",
    "throughput_mlp",
    "throughput_mlp_nw1",
    "throughput_cnn",
    "flops_mlp_digits_b512",
    "flops_mlp_mnist_b512",
    "flops_mlp_mnist_bare_b512",
    "flops_mlp_wide_b512",
    "share_bn_stats_default",
    "share_wandb_default",
    "share_eval_default",
    "share_bn_stats_mnist_mlp",
    "share_wandb_mnist_mlp",
    "share_eval_mnist_mlp",
    *(f"share_bn_points_{d}_{m}" for m in ("mlp", "cnn", "lenet") for d in ("digits", "mnist")),
    "startup_first_step",
    "startup_heavy_imports",
    "sweep_10_jobs",
    "stacked_steps_digits",
    "stacked_steps_mnist",
    "stacked_sweep_digits",
    "stacked_sweep_digits_wall",
    "stacked_flops_digits",
    "stacked_sweep_mnist",
    "stacked_sweep_mnist_wall",
    "stacked_flops_mnist",
    "threads_1_vs_2",
    "threads_oversubscribed",
    "threads_auto_under_load",
    "threads_auto_alone",
    "threads_auto_same_bytes",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sample counts (about a minute)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--threads", default="auto", help="torch threads ('auto' as trainer.num_threads)"
    )
    ap.add_argument("--data", default="data", help="root holding MNIST/raw IDX files, if any")
    ap.add_argument("--markdown", type=Path, help="also write the markdown table to this file")
    ap.add_argument("--only", nargs="*", help="run only these row functions (e.g. row_gemm)")
    return ap.parse_args(argv)


def bench_data(root: Path, work: Path, quick: bool) -> tuple[Path, bool]:
    """(data root, whether it holds real MNIST): ``root`` if it has the IDX files, else
    generated ones of the same shape under ``work``."""
    if (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        return root, True
    root = work / "data"
    write_idx(root, *((12000, 2000) if quick else (60000, 10000)))
    return root, False


def run_row(fn: Callable[[Bench], list[Row]], b: Bench) -> tuple[list[Row], bool]:
    """One row function, its rows printed as they come: (rows, whether it ran)."""
    t0 = time.perf_counter()
    ok = True
    try:
        got = fn(b)
    except Exception as e:  # one broken row must not hide the others
        ok = False
        got = [Row(fn.__name__, f"failed: {type(e).__name__}: {e}", ok=False)]
    for r in got:
        print(console_line(r), flush=True)
    print(f"  ({fn.__name__}: {time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return got, ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible here", file=sys.stderr)
        return 2
    n_threads = resolve_threads(args.threads)
    torch.set_num_threads(n_threads)
    os.environ.setdefault("WANDB_SILENT", "true")
    start = time.perf_counter()
    failed = []
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="mnistlab-bench-") as tmp:
        work = Path(tmp)
        root, real = bench_data(Path(args.data), work, args.quick)
        b = Bench(args.quick, args.device, n_threads, root.resolve(), real, work)
        print(
            f"mnistlab bench ({'quick' if args.quick else 'full'}, {args.device}), "
            f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
            flush=True,
        )
        for fn in ROWS:
            if args.only and fn.__name__ not in args.only:
                continue
            got, ok = run_row(fn, b)
            rows += got
            if not ok:
                failed.append(fn.__name__)
    table = markdown(rows)
    print("\nMarkdown rows for docs/benchmarks.md:\n")
    print(table)
    print(f"bench took {time.perf_counter() - start:.0f} s")
    if args.markdown:
        from mnistlab.core.files import atomic_write_bytes

        atomic_write_bytes(args.markdown, table.encode())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
