"""The EMA theory beside the measurement: after t updates the initial value keeps weight
``(1 - m)^t``, and for a stationary input the EMA's noise variance is
``m / (2 - m) * (1 - (1 - m)^(2t))`` times the variance of one batch's statistic, which the
exact pass measures directly (sub-batches of the training batch size) instead of assuming
independent spatial positions.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def init_weight(momentum: float | None, t: int) -> float:
    """Weight the running value still puts on its initial value after ``t`` updates."""
    if momentum is None:  # cumulative average: the first update replaces the initial value
        return 1.0 if t == 0 else 0.0
    return (1.0 - momentum) ** t


def noise_factor(momentum: float | None, t: int) -> float:
    """Var(EMA) / Var(one batch's statistic) for a stationary input after ``t`` updates.

    ``sum_k w_k^2`` over the batch weights: ``m / (2 - m) * (1 - (1 - m)^(2t))`` for an EMA
    (-> ``m / (2 - m)`` for large t), ``1 / t`` for the cumulative average.
    """
    if t <= 0:
        return 0.0
    if momentum is None:
        return 1.0 / t
    m = momentum
    return m / (2.0 - m) * (1.0 - (1.0 - m) ** (2 * t))


def folded_mean(mu: Tensor, sd: Tensor) -> Tensor:
    """E|X| for X ~ N(mu, sd^2): the expected size of a gap with bias mu and noise sd."""
    mu, sd = mu.double(), sd.double()
    safe = sd.clamp_min(1e-300)
    val = sd * math.sqrt(2 / math.pi) * torch.exp(-(mu**2) / (2 * safe**2)) + mu * torch.erf(
        mu / (safe * math.sqrt(2))
    )
    return torch.where(sd > 0, val, mu.abs())


def folded_mean_np(mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """:func:`folded_mean` on numpy arrays (the erf borrowed from torch, zero-copy)."""
    safe = np.maximum(sd, 1e-300)
    erf = torch.from_numpy(mu / (safe * math.sqrt(2))).erf_().numpy()
    val = sd * math.sqrt(2 / math.pi) * np.exp(-(mu**2) / (2 * safe**2)) + mu * erf
    return np.where(sd > 0, val, np.abs(mu))
