"""``python -m mnistlab.eval RUN [key=value ...]`` (also ``mnistlab-eval``): a saved run,
evaluated again from its checkpoint (:mod:`mnistlab.app.evaluation` rebuilds and measures it).

RUN is a run folder (its ``checkpoints/last.pt`` is read, or with ``--ckpt best`` its
``checkpoints/best.pt``) or a checkpoint file. The report (loss and accuracy on every split
besides ``train``, the BN gaps, with ``bn_stats.recalibrate=true`` the test accuracy after
PreciseBN) is printed and written atomically to ``RUN/eval.json`` (``RUN/eval_best.json`` for
``--ckpt best``; or ``--out``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mnistlab.app.evaluation import USAGE_HINT, evaluate_run
from mnistlab.core.errors import quiet_on_closed_pipe, report, user_message
from mnistlab.core.files import atomic_write_json


def render(result: Mapping[str, Any]) -> str:
    """The report as a user reads it: where the checkpoint stood, then one metric a line."""
    c = result["counted"]
    lines = [
        f"{result['checkpoint']}: optimizer step {c['total_steps']}, epoch {c['epochs']}, "
        f"{c['total_micro_batches']} micro-batches"
    ]
    width = max((len(k) for k in result["metrics"]), default=0)
    lines += [f"  {k:<{width}}  {v:.6g}" for k, v in result["metrics"].items()]
    return "\n".join(lines)


@quiet_on_closed_pipe
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mnistlab.eval",
        description="Evaluate a saved run from its checkpoint: every evaluation split, the BN "
        "gaps, and with bn_stats.recalibrate=true the accuracy after PreciseBN.",
    )
    p.add_argument("run", type=Path, help="a run folder, or a checkpoint file")
    p.add_argument("overrides", nargs="*", help=f"key=value changes to its config, {USAGE_HINT}")
    p.add_argument(
        "--ckpt",
        choices=("last", "best"),
        default="last",
        help="a run folder's checkpoint: last.pt (default) or best.pt, the objective's best",
    )
    p.add_argument(
        "--out", type=Path, metavar="PATH",
        help="the JSON report (RUN/eval.json; RUN/eval_best.json with --ckpt best)",
    )  # fmt: skip
    args = p.parse_intermixed_args(argv)
    try:
        result, run_dir = evaluate_run(args.run, args.overrides, args.ckpt)
        out = args.out or run_dir / ("eval.json" if args.ckpt == "last" else "eval_best.json")
        atomic_write_json(out, result)
    except Exception as e:
        message = user_message(e)  # run_config turned the config's into lines
        if message is None:
            raise
        return report(message)
    print(render(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
