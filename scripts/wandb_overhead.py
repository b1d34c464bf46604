"""What W&B costs a training run: the default config with ``logger=none`` against
``logger=wandb`` (offline), run in alternation so both see the same machine load.

    python scripts/wandb_overhead.py [--pairs 5] [overrides ...]

Reports the median training time of each, the difference as a share of training time, and
the time the W&B sink itself spent in ``wandb.init``, ``run.log`` and ``run.finish``
(``summary.json`` -> ``timings.wandb_*_s``). ``run.log`` is the part paid inside the steps;
``init`` and ``finish`` are paid once, before and after training. On a busy machine wall
times are noisy; the CPU seconds of each whole run (W&B's own service process included, as a
waited-for child) are the steadier measure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def one_run(out: Path, logger: str, overrides: list[str]) -> dict[str, Any]:
    env = dict(os.environ, WANDB_SILENT="true", WANDB_MODE="offline")
    args = [sys.executable, "-m", "mnistlab.train", f"hydra.run.dir={out}", f"logger={logger}"]
    args += ["logger.wandb.mode=offline", "trainer.progress=none", *overrides]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(args, cwd=ROOT, env=env, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    summary = json.loads((out / "summary.json").read_text())
    rows = sum(1 for _ in (out / "metrics.jsonl").open())
    steps = summary["counted"]["total_steps"]
    return {**summary["timings"], "cpu_s": cpu_s, "rows": rows, "steps": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {"none": [], "wandb": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            order = ("none", "wandb") if i % 2 == 0 else ("wandb", "none")
            for logger in order:
                runs[logger].append(one_run(Path(tmp) / f"{i}-{logger}", logger, args.overrides))

    def med(logger: str, key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in runs[logger])

    base, with_wandb = med("none", "train_s"), med("wandb", "train_s")
    w = runs["wandb"][0]
    print(f"{args.pairs} pairs, {w['steps']} optimizer steps, {w['rows']} rows logged per run")
    print(f"train_s median: logger=none {base:.3f} s, logger=wandb {with_wandb:.3f} s")
    print(f"difference: {with_wandb - base:+.3f} s ({(with_wandb - base) / base:+.1%} of training)")
    pairs = [w["train_s"] - n["train_s"] for w, n in zip(runs["wandb"], runs["none"], strict=True)]
    paired = statistics.median(pairs)
    print(f"median of paired differences: {paired:+.3f} s ({paired / base:+.1%} of training)")
    for key in ("wandb_init_s", "wandb_log_s", "wandb_finish_s"):
        share = med("wandb", key) / with_wandb
        print(f"{key} median: {med('wandb', key):.4f} s ({share:.2%} of training time)")
    none_cpu, wandb_cpu = med("none", "cpu_s"), med("wandb", "cpu_s")
    print(
        f"CPU seconds per run, median: logger=none {none_cpu:.2f}, logger=wandb {wandb_cpu:.2f}",
        end="",
    )
    print(f" ({(wandb_cpu - none_cpu) / none_cpu:+.1%})")
    print(f"wall_s median: logger=none {med('none', 'wall_s'):.3f} s, ", end="")
    print(f"logger=wandb {med('wandb', 'wall_s'):.3f} s")


if __name__ == "__main__":
    main()
