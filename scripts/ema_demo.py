"""The textbook's scalar EMA example, done right: what a BatchNorm running mean really estimates.

10,000 standard-normal values in batches of 5 (2,000 batches), momentum m = 0.001, the EMA
started at 0. Four estimators side by side, plus PyTorch's own ``BatchNorm1d`` as a check:

- ``ema = m * ema + (1 - m) * batch_mean``: the textbook's slip. It puts weight 1 - m = 0.999
  on the newest batch, so it is essentially the last batch's mean.
- ``ema = (1 - m) * ema + m * batch_mean``: PyTorch's convention (m = weight of the new
  batch). After t = 2,000 updates the initial 0 still carries weight (1 - m)^t = 0.135.
- the bias-corrected EMA, ``ema / (1 - (1 - m)^t)``, which removes that weight.

The same stream shifted to mean 1 shows that weight: the PyTorch-convention EMA lands near
(1 - 0.135) * 1, the bias-corrected one near 1. Then a grid over momentum and batch size
compares the measured RMS error of the EMA with the theory in ``mnistlab.bn.stats`` (initial
weight and noise factor). ``--plot`` draws the shifted stream's estimators, the initial
value's weight and the grid. Run:
``python scripts/ema_demo.py [--seed 0] [--plot ema.png] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch

from mnistlab.bn.theory import init_weight, noise_factor

N_VALUES, BATCH, MOMENTUM = 10_000, 5, 0.001
SHIFT = 1.0  # the shifted stream's mean: large against the EMA's noise, so the bias shows


def scalar_experiment(
    seed: int = 0, n: int = N_VALUES, batch: int = BATCH, m: float = MOMENTUM, offset: float = 0.0
) -> dict[str, Any]:
    """Run the four estimators and BatchNorm1d over one seeded stream of N(offset, 1) values
    (the same draws for every offset); return the results."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=g, dtype=torch.float64) + offset
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
        "offset": offset,
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


def format_shifted(res: dict[str, Any]) -> list[str]:
    """The shifted stream in three lines: where the initial value's weight shows."""
    mu, w0 = res["offset"], res["init_weight"]
    return [
        f"The same values shifted to mean {mu:g} (N({mu:g}, 1)): true mean {res['true_mean']:.4f}",
        f"  PyTorch ema {res['ema']:.4f} (expects (1 - {w0:.3f}) * {mu:g} = {(1 - w0) * mu:.4f}), "
        f"BatchNorm1d {res['bn_running_mean']:.4f}",
        f"  bias-corrected ema {res['ema_corrected']:.4f}: the starting 0's weight removed",
    ]


def format_tables(
    res: dict[str, Any], rows: list[dict[str, float]], shifted: dict[str, Any] | None = None
) -> str:
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
        *([*format_shifted(shifted), ""] if shifted is not None else []),
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


def plot(shifted: dict[str, Any], rows: list[dict[str, float]], path: str) -> None:
    """Three panels: the estimators on the shifted stream with the EMA's expected value, the
    initial value's weight (1 - m)^t, and the grid's measured against predicted RMS error."""
    from pathlib import Path

    from mnistlab.results.pictures import new_figure, save_png

    fig = new_figure(15, 4.8)
    traj, weight, grid_ax = fig.subplots(1, 3, width_ratios=[2, 1, 1.2])
    m, mu, t = shifted["momentum"], shifted["offset"], shifted["updates"]
    steps = range(1, t + 1)
    tr = shifted["trajectories"]
    traj.plot(steps, tr["wrong"], lw=0.5, alpha=0.5, color="C7", label="m*ema + (1-m)*batch (slip)")
    traj.plot(steps, tr["ema"], color="C0", label="(1-m)*ema + m*batch (PyTorch)")
    traj.plot(steps, tr["corrected"], color="C2", label="bias-corrected ema / (1 - (1-m)^t)")
    expected = [(1 - init_weight(m, i)) * mu for i in steps]
    traj.plot(steps, expected, "k--", lw=1, label="expected PyTorch ema: (1 - (1-m)^t) * mu")
    traj.axhline(shifted["true_mean"], color="C3", ls=":", label="true mean of the values")
    traj.set(
        ylim=(mu - 1.5, mu + 1.5),
        xlabel=f"update (batch of {shifted['batch']})",
        ylabel="estimate of the mean",
        title=f"N({mu:g}, 1) values, m = {m}: the EMA ends {shifted['ema']:.3f}, "
        f"bias-corrected {shifted['ema_corrected']:.3f}",
    )
    traj.legend(fontsize=7, loc="lower right")
    weight.plot(steps, [init_weight(m, i) for i in steps], color="C0")
    weight.plot([t], [init_weight(m, t)], "o", color="C3")
    weight.annotate(
        f"{init_weight(m, t):.3f} after {t}",
        (t, init_weight(m, t)),
        textcoords="offset points",
        xytext=(-10, 12),
        ha="right",
    )
    weight.set(
        ylim=(0, 1.02), xlabel="update", ylabel="(1 - m)^t", title="weight still on the starting 0"
    )
    _draw_grid(grid_ax, rows)
    for ax in (traj, weight, grid_ax):
        ax.grid(alpha=0.3, which="both")
    save_png(fig, Path(path), dpi=120)


def _draw_grid(ax: Any, rows: list[dict[str, float]]) -> None:
    """Measured against predicted RMS error, one point per (momentum, batch), on log axes."""
    measured = [r["measured_rms"] for r in rows]
    predicted = [r["predicted_rms"] for r in rows]
    low, high = min(measured + predicted) / 1.5, max(measured + predicted) * 1.5
    ax.plot([low, high], [low, high], "k--", lw=1, label="measured = predicted")
    for i, r in enumerate(rows):
        ax.plot(
            r["predicted_rms"],
            r["measured_rms"],
            "o",
            color=f"C{i}",
            label=f"m={r['momentum']:g}, b={r['batch']:g}: ratio {r['ratio']:.2f}",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlim=(low, high),
        ylim=(low, high),
        xlabel="predicted RMS error: sqrt(bias^2 + noise)",
        ylabel="measured RMS error",
        title="EMA error over seeded streams of N(1, 1)",
    )
    ax.legend(fontsize=7, loc="upper left")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=400, help="streams per grid cell")
    ap.add_argument("--plot", default=None, help="write a PNG here: shifted stream, grid")
    ap.add_argument("--json", default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = scalar_experiment(args.seed)
    shifted = scalar_experiment(args.seed, offset=SHIFT)
    rows = grid(args.seed, repeats=args.repeats)
    print(format_tables(res, rows, shifted))
    if args.plot:
        plot(shifted, rows, args.plot)
        print(f"plot written to {args.plot}")
    if args.json:
        from pathlib import Path

        from mnistlab.core.files import atomic_write_json

        out = {k: v for k, v in res.items() if k != "trajectories"} | {"grid": rows}
        out["shifted"] = {k: v for k, v in shifted.items() if k != "trajectories"}
        atomic_write_json(Path(args.json), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
