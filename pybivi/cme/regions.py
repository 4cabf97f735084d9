"""Where the bursty approximator's domain ends, and which rule handles each pair outside it.

The approximator (:mod:`pybivi.cme.approximator`) and the fit diagnostics
(:mod:`pybivi.diagnostics`) share these definitions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pybivi.cme.domain import BOX, STATE_CAP

__all__ = ["B_SMALL", "DOMAIN_REGIONS", "domain_regions", "box_tensor"]

B_SMALL = 1e-3  # below this burst size the exact small-b limit is used

DOMAIN_REGIONS = ("small_burst", "clamped_b", "clamped_rates", "state_cap")
"""Regions outside the approximator's domain, in the order :func:`domain_regions` assigns them."""


def domain_regions(n: Tensor, b: Tensor, beta: Tensor, gamma: Tensor) -> dict[str, Tensor]:
    """Which rule of the approximator handles each pair: boolean masks, one per region.

    Each pair outside the domain is assigned to the first region it belongs to, in the
    order of :data:`DOMAIN_REGIONS`, so the masks are disjoint and their union is
    exactly the set counted by the approximator's ``outside_count``:

    * ``small_burst``: ``b < 1e-3``; the exact small-burst limit ``Poisson(b / gamma)``
      (independent of ``n``) replaces the network;
    * ``clamped_b``: ``b > 1e3``; the network sees ``log b`` clamped to the box edge;
    * ``clamped_rates``: ``beta`` or ``gamma`` (in units of the burst frequency) outside
      the box; the network sees them clamped;
    * ``state_cap``: inside the box, but ``n > STATE_CAP`` or ``mean + 10 sd`` of either
      species above ``STATE_CAP``; the network sees ``n`` clamped to the cap.

    Parameters
    ----------
    n
        Nascent counts.
    b, beta, gamma
        Burst size and rates in units of the burst frequency (broadcastable with ``n``).

    Returns
    -------
    dict
        ``{region: bool tensor}`` of the broadcast shape, plus ``"inside"``.
    """
    n, b, beta, gamma = torch.broadcast_tensors(
        *(torch.as_tensor(t, dtype=torch.float64) for t in (n, b, beta, gamma))
    )
    lo = {k: 10.0 ** v[0] for k, v in BOX.items()}
    hi = {k: 10.0 ** v[1] for k, v in BOX.items()}
    small = b < B_SMALL
    big_b = ~small & (b > hi["log10_b"])
    rates = (
        (beta < lo["log10_beta"]) | (beta > hi["log10_beta"])
        | (gamma < lo["log10_gamma"]) | (gamma > hi["log10_gamma"])
    ) & ~small & ~big_b
    mean_n, mean_m = b / beta, b / gamma
    sd_n = torch.sqrt(mean_n * (1.0 + b))
    sd_m = torch.sqrt(mean_m * (1.0 + b * beta / (beta + gamma)))
    capped = (n > STATE_CAP) | (mean_n + 10.0 * sd_n > STATE_CAP)
    capped |= mean_m + 10.0 * sd_m > STATE_CAP
    capped &= ~small & ~big_b & ~rates
    out = {"small_burst": small, "clamped_b": big_b, "clamped_rates": rates, "state_cap": capped}
    out["inside"] = ~(small | big_b | rates | capped)
    return out


def box_tensor() -> tuple[Tensor, Tensor]:
    """The training box's lower and upper corners in natural-log units (b, beta, gamma)."""
    ln10 = math.log(10.0)
    lo = torch.tensor([BOX[k][0] * ln10 for k in ("log10_b", "log10_beta", "log10_gamma")])
    hi = torch.tensor([BOX[k][1] * ln10 for k in ("log10_b", "log10_beta", "log10_gamma")])
    return lo, hi
