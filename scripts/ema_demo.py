"""The textbook's scalar EMA example, done right: what a BatchNorm running mean really estimates.

10,000 standard-normal values in batches of 5 (2,000 batches), momentum m = 0.001, the EMA
started at 0. Four estimators side by side, plus PyTorch's own ``BatchNorm1d`` as a check:

- ``ema = m * ema + (1 - m) * batch_mean``: the textbook's slip. It puts weight 1 - m = 0.999
  on the newest batch, so it is essentially the last batch's mean.
- ``ema = (1 - m) * ema + m * batch_mean``: PyTorch's convention (m = weight of the new
  batch). After t = 2,000 updates the initial 0 still carries weight (1 - m)^t = 0.135.
- the bias-corrected EMA, ``ema / (1 - (1 - m)^t)``, which removes that weight.

Then a grid over momentum and batch size compares the measured RMS error of the EMA with the
theory in ``mnistlab.bnstats`` (initial weight and noise factor). Run:
``python scripts/ema_demo.py [--seed 0] [--plot ema.png] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch

from mnistlab.bnstats import init_weight, noise_factor

N_VALUES, BATCH, MOMENTUM = 10_000, 5, 0.001


def scalar_experiment(
    seed: int = 0, n: int = N_VALUES, batch: int = BATCH, m: float = MOMENTUM
) -> dict[str, Any]:
    """Run the four estimators and BatchNorm1d over one seeded stream; return the results."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=g, dtype=torch.float64)
    batch_means = values.reshape(-1, batch).mean(1)
    t = len(batch_means)
    wrong = right = 0.0
    traj_wrong, traj_right, traj_corr = [], [], []
    for i, bm in enumerate(batch_means.tolist(), start=1):
        wrong = m * wrong + (1 - m) * bm
        right = (1 - m) * right + m * bm
        traj_wrong.append(wrong)
        traj_right.append(right)
        traj_corr.append(right / (1 - (1 - m) ** i))
    bn = torch.nn.BatchNorm1d(1, momentum=m, affine=False)  # running_mean starts at 0
    bn.train()
    with torch.no_grad():
        for chunk in values.float().reshape(-1, batch, 1):
            bn(chunk)
    return {
        "seed": seed,
        "n": n,
        "batch": batch,
        "momentum": m,
        "updates": t,
        "true_mean": float(values.mean()),
        "population_mean": 0.0,
        "last_batch_mean": float(batch_means[-1]),
        "wrong_ema": wrong,
        "ema": right,
        "ema_corrected": traj_corr[-1],
        "bn_running_mean": float(bn.running_mean[0]),
        "bn_num_batches_tracked": int(bn.num_batches_tracked),
        "weight_newest_wrong": 1 - m,
        "weight_newest_ema": m,
        "init_weight": init_weight(m, t),
        "noise_sd_pred": math.sqrt(noise_factor(m, t) / batch),
        "trajectories": {"wrong": traj_wrong, "ema": traj_right, "corrected": traj_corr},
    }


def grid(
    seed: int = 0,
    momenta: tuple[float, ...] = (0.001, 0.01, 0.1),
    batches: tuple[int, ...] = (5, 50),
    repeats: int = 400,
    n: int = N_VALUES,
    offset: float = 1.0,
) -> list[dict[str, float]]:
    """Measured vs predicted RMS error of the EMA over ``repeats`` seeded streams.

    Values are N(offset, 1), so the initial-value bias ``(1 - m)^t * offset`` shows; the
    prediction is ``sqrt(bias^2 + noise_factor / b)``.
    """
    g = torch.Generator().manual_seed(seed + 1)
    rows = []
    for b in batches:
        t = n // b
        means = torch.randn(repeats, t, b, generator=g, dtype=torch.float64).mean(2) + offset
        for m in momenta:
            ema = torch.zeros(repeats, dtype=torch.float64)
            for i in range(t):
                ema.mul_(1 - m).add_(m * means[:, i])
            measured = float((ema - offset).square().mean().sqrt())
            bias = init_weight(m, t) * offset
            predicted = math.sqrt(bias**2 + noise_factor(m, t) / b)
            rows.append(
                {
                    "momentum": m,
                    "batch": b,
                    "updates": t,
                    "init_weight": init_weight(m, t),
                    "measured_rms": measured,
                    "predicted_rms": predicted,
                    "ratio": measured / predicted,
                }
            )
    return rows


def format_tables(res: dict[str, Any], rows: list[dict[str, float]]) -> str:
    m, t = res["momentum"], res["updates"]
    lines = [
        f"{res['n']} standard-normal values, batches of {res['batch']} ({t} updates), "
        f"momentum m = {m}, EMA started at 0, seed {res['seed']}",
        "",
        f"{'estimator':<44} {'value':>9} {'w(newest)':>10} {'w(start 0)':>11}",
        f"{'true mean of the 10,000 values':<44} {res['true_mean']:>9.4f} {'':>10} {'':>11}",
        f"{'last batch mean':<44} {res['last_batch_mean']:>9.4f} {'1':>10} {'0':>11}",
        f"{'ema = m*ema + (1-m)*batch   (textbook slip)':<44} {res['wrong_ema']:>9.4f} "
        f"{res['weight_newest_wrong']:>10.3f} {0.0:>11.3g}",
        f"{'ema = (1-m)*ema + m*batch   (PyTorch)':<44} {res['ema']:>9.4f} "
        f"{res['weight_newest_ema']:>10.3f} {res['init_weight']:>11.3f}",
        f"{'bias-corrected ema / (1 - (1-m)^t)':<44} {res['ema_corrected']:>9.4f} "
        f"{res['weight_newest_ema'] / (1 - res['init_weight']):>10.5f} {0.0:>11.3g}",
        f"{'torch BatchNorm1d running_mean':<44} {res['bn_running_mean']:>9.4f} "
        f"{res['weight_newest_ema']:>10.3f} {res['init_weight']:>11.3f}",
        "",
        f"After t = {t} updates the starting 0 keeps weight (1 - m)^t = {res['init_weight']:.3f}: "
        f"for data with mean mu the EMA expects (1 - {res['init_weight']:.3f}) * mu.",
        f"Predicted noise sd of the EMA: sqrt(m/(2-m) * (1-(1-m)^2t) / b) = "
        f"{res['noise_sd_pred']:.4f}; BatchNorm1d counted {res['bn_num_batches_tracked']} updates.",
        "",
        "Grid: RMS error of the PyTorch-convention EMA over seeded streams of N(1, 1) values",
        f"{'momentum':>9} {'batch':>6} {'updates':>8} {'w(start)':>9} {'measured':>9} "
        f"{'predicted':>10} {'ratio':>6}",
    ]
    for r in rows:
        lines.append(
            f"{r['momentum']:>9} {r['batch']:>6} {r['updates']:>8} {r['init_weight']:>9.3g} "
            f"{r['measured_rms']:>9.4f} {r['predicted_rms']:>10.4f} {r['ratio']:>6.3f}"
        )
    return "\n".join(lines)


def plot(res: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    tr = res["trajectories"]
    ax.plot(tr["wrong"], lw=0.5, alpha=0.6, label="m*ema + (1-m)*batch (slip)")
    ax.plot(tr["ema"], label="(1-m)*ema + m*batch (PyTorch)")
    ax.plot(tr["corrected"], label="bias-corrected")
    ax.axhline(res["true_mean"], color="k", ls="--", lw=1, label="true mean")
    ax.set_ylim(-1.5, 1.5)
    ax.set_xlabel("update (batch of 5)")
    ax.set_ylabel("estimate of the mean")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=400, help="streams per grid cell")
    ap.add_argument("--plot", default=None, help="write a PNG of the trajectories here")
    ap.add_argument("--json", default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = scalar_experiment(args.seed)
    rows = grid(args.seed, repeats=args.repeats)
    print(format_tables(res, rows))
    if args.plot:
        plot(res, args.plot)
        print(f"plot written to {args.plot}")
    if args.json:
        from pathlib import Path

        from mnistlab.files import atomic_write_json

        out = {k: v for k, v in res.items() if k != "trajectories"} | {"grid": rows}
        atomic_write_json(Path(args.json), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
