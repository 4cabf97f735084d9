"""The small network of the bursty approximator: features in, kernel placement and weights out.

:class:`ConditionalNet` maps seven features of ``(n, b, beta/k, gamma/k)`` and of the moment
match to the NB kernels' log-weights, the corrections of their centre and spread, and their
shared shape; :class:`pybivi.cme.approximator.BurstyConditional` freezes one and evaluates it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pybivi.cme.mixture import LOG_R_MAX, LOG_R_MIN, nodes
from pybivi.cme.moments import SLOPES


class ConditionalNet(nn.Module):
    """MLP giving the kernel weights and corrections, plus the kernel evaluation.

    Parameters
    ----------
    n_kernels
        Number of NB kernels ``K``.
    width, depth
        Hidden width and number of hidden layers.
    activation
        ``"relu"`` (default: the cheapest on a CPU, forward and backward) or ``"silu"``
        (smooth, but its exponentials underflow to subnormal floats for large inputs,
        measured 10 to 40 times slower per layer here).
    moment_slope
        Slope of the moment match that places the kernels (``"gamma"``, the default, or
        ``"lognormal"`` for weights written before the option; see
        :func:`pybivi.cme.moments.moment_base`).
    """

    n_features = 7

    def __init__(
        self,
        n_kernels: int = 10,
        width: int = 32,
        depth: int = 2,
        activation: str = "relu",
        moment_slope: str = "gamma",
    ) -> None:
        super().__init__()
        if activation not in ("relu", "silu"):
            raise ValueError(f"activation must be 'relu' or 'silu', got {activation!r}")
        if moment_slope not in SLOPES:
            raise ValueError(f"moment_slope must be one of {SLOPES}, got {moment_slope!r}")
        self.moment_slope = moment_slope
        act = nn.ReLU if activation == "relu" else nn.SiLU
        layers: list[nn.Module] = []
        d = self.n_features
        for _ in range(depth):
            layers += [nn.Linear(d, width), act()]
            d = width
        layers.append(nn.Linear(d, n_kernels + 3))
        self.mlp = nn.Sequential(*layers)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        z = nodes(n_kernels)
        self.register_buffer("z", z)
        self.register_buffer("dz", (z[1:] - z[:-1]).mean().reshape(()))
        self.config = {
            "n_kernels": n_kernels,
            "width": width,
            "depth": depth,
            "activation": activation,
            "moment_slope": moment_slope,
        }

    def features(
        self, n: Tensor, lb: Tensor, lbeta: Tensor, lgamma: Tensor, c: Tensor, sigma: Tensor
    ) -> Tensor:
        """MLP inputs (about unit scale) from log-parameters already clamped to the box."""
        ln10 = math.log(10.0)
        mu_m = lb - lgamma
        return torch.stack(
            [
                lb / (3 * ln10),
                lbeta / (2 * ln10),
                (lgamma + 0.5 * ln10) / (2.5 * ln10),
                torch.log1p(n) / 4.0 - 1.0,
                (c - mu_m) / 2.0,
                torch.log(sigma + 1e-3),
                (mu_m - torch.log1p(n)) / 5.0,
            ],
            dim=-1,
        )

    def heads(self, feats: Tensor, c: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Kernel log-means ``(K, ...)``, log-weights ``(K, ...)`` and log shape ``(...)``.

        The kernel axis comes first so that the per-kernel arithmetic and the reduction
        over kernels run over contiguous pairs.
        """
        out = torch.movedim(self.mlp(feats), -1, 0).contiguous()
        k = self.z.numel()
        logw = torch.log_softmax(out[:k], dim=0)
        centre = c + out[k]
        spread = sigma * torch.exp(out[k + 1].clamp(-6.0, 3.0))
        z = self.z.reshape((k,) + (1,) * centre.dim())
        # Means above e^30 never occur in the domain; the cap keeps exp() finite anywhere.
        log_means = (centre + spread * z).clamp(max=30.0)
        log_r = -2.0 * torch.log(spread * self.dz + 1e-3) + out[k + 2]
        return log_means, logw, log_r.clamp(LOG_R_MIN, LOG_R_MAX)
