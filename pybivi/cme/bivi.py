"""biVI's original trained approximator of the bursty ``P(m | n)`` as an alternative backend.

biVI (Carilli et al. 2024, Gorin et al. 2024) ships a PyTorch ``state_dict`` (keys
``input``, ``hidden``, ``output``, ``hyp``, each ``.weight``/``.bias``): an MLP with 7
inputs ``(log10 b, log10 beta, log10 gamma, logmean_cond, logstd_cond, xmax_m, n)``,
two sigmoid layers of 256, a softmax over 10 kernel weights and ``h = 1 + 5 sigmoid(.)``
read from the second hidden layer. Kernel ``j`` has mean ``exp(logmean_cond + logstd_cond
z_j)`` at Chebyshev-spaced normal quantiles; its standard deviation is ``h`` times the gap
to the next mean (the last one ``sqrt(mean)``); it is an NB where that is overdispersed
and a Poisson otherwise. This module reproduces that computation, with two deliberate
differences that change no value inside biVI's range: the mixture is summed in log space
(biVI adds 1e-8 to probabilities, flooring log-likelihoods at about -18.4) and the NB
term uses ``lgamma(m + r)`` (an old biVI version used ``lgamma(mean + r)``). The weights
file is not part of pybivi (BSD-2-Clause, Pachter Lab); pass its path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from pybivi.cme.mixture import nodes

_KEYS = {
    "input.weight": (256, 7),
    "input.bias": (256,),
    "hidden.weight": (256, 256),
    "hidden.bias": (256,),
    "output.weight": (10, 256),
    "output.bias": (10,),
    "hyp.weight": (1, 256),
    "hyp.bias": (1,),
}


class BiVIConditional(nn.Module):
    """biVI's frozen network with the :meth:`log_prob_mature_given_nascent` interface.

    Parameters
    ----------
    state_dict
        biVI's tensors (see the module docstring for names and shapes).
    dtype
        Arithmetic precision (biVI runs in float32; float64 avoids its invalid values).
    """

    domain = {
        "box": {"b": [1.0, 300.0], "beta": [0.05, 50.0], "gamma": [0.05, 50.0]},
        "outside": "extrapolates without warning (biVI's behaviour)",
    }

    def __init__(self, state_dict: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        for key, shape in _KEYS.items():
            if key not in state_dict or tuple(state_dict[key].shape) != shape:
                got = tuple(state_dict[key].shape) if key in state_dict else "missing"
                raise ValueError(
                    f"not a biVI approximator: {key} should have shape {shape}, got {got}"
                )
        self.input = nn.Linear(7, 256)
        self.hidden = nn.Linear(256, 256)
        self.output = nn.Linear(256, 10)
        self.hyp = nn.Linear(256, 1)
        self.load_state_dict({k: state_dict[k] for k in _KEYS})
        self.register_buffer("z", nodes(10))
        self.to(dtype)
        self.dtype = dtype
        for p in self.parameters():
            p.requires_grad_(False)

    def _features(self, n: Tensor, b: Tensor, beta: Tensor, gamma: Tensor):
        mu1, mu2 = b / beta, b / gamma
        var1 = mu1 * (1 + b)
        var2 = mu2 * (1 + b * beta / (beta + gamma))
        cov = b**2 / (beta + gamma)
        logvar1, logvar2 = torch.log(var1 / mu1**2 + 1), torch.log(var2 / mu2**2 + 1)
        logstd1, logstd2 = torch.sqrt(logvar1), torch.sqrt(logvar2)
        logmean1 = torch.log(mu1**2 / torch.sqrt(var1 + mu1**2))
        logmean2 = torch.log(mu2**2 / torch.sqrt(var2 + mu2**2))
        val = (logmean1 + logmean2 + (logvar1 + logvar2) / 2).clamp(min=-88)
        logcorr = torch.log(cov * torch.exp(-val) + 1) / torch.sqrt(logvar1 * logvar2)
        logmean_cond = logmean2 + logcorr * logstd2 / logstd1 * (torch.log(n + 1) - logmean1)
        logstd_cond = logstd2 * torch.sqrt(1 - logcorr**2)
        xmax_m = torch.ceil(torch.ceil(mu2) + 4 * torch.sqrt(var2)).clamp(min=30).detach()
        feats = torch.stack(
            [
                torch.log10(b),
                torch.log10(beta),
                torch.log10(gamma),
                logmean_cond,
                logstd_cond,
                xmax_m,
                n,
            ],
            dim=-1,
        )
        return feats, logmean_cond, logstd_cond

    def log_prob_mature_given_nascent(
        self, nascent: Tensor, mature: Tensor, b: Tensor, beta: Tensor, gamma: Tensor
    ) -> Tensor:
        """biVI's ``log Phat(m | n)`` (broadcasting; differentiable in ``b, beta, gamma``)."""
        out_dtype = next(
            (t.dtype for t in (b, beta, gamma) if torch.is_tensor(t) and t.is_floating_point()),
            torch.get_default_dtype(),
        )
        ts = torch.broadcast_tensors(
            *(torch.as_tensor(t) for t in (nascent, mature, b, beta, gamma))
        )
        n, m, b, beta, gamma = (t.to(self.dtype) for t in ts)
        feats, logmean_cond, logstd_cond = self._features(n, b, beta, gamma)
        h1 = torch.sigmoid(self.input(feats))
        h2 = torch.sigmoid(self.hidden(h1))
        logw = torch.log_softmax(self.output(h2), dim=-1)
        hyp = 1 + 5 * torch.sigmoid(self.hyp(h2))
        grid = torch.exp(logmean_cond.unsqueeze(-1) + logstd_cond.unsqueeze(-1) * self.z)
        sd = torch.cat([torch.diff(grid, dim=-1) * hyp, torch.sqrt(grid[..., -1:])], dim=-1)
        var = sd**2
        over = var - grid > 1e-10 * var  # biVI: NB where p = 1 - mean/var > 1e-10
        safe_excess = torch.where(over, var - grid, torch.ones_like(var))
        r = grid**2 / safe_excess
        mm = m.unsqueeze(-1)
        log_poisson = mm * torch.log(grid) - grid - torch.lgamma(mm + 1)
        log_nb = (
            torch.lgamma(mm + r)
            - torch.lgamma(r)
            - torch.lgamma(mm + 1)
            + r * torch.log(r / (r + grid))
            + mm * torch.log(grid / (r + grid))
        )
        logk = torch.where(over, log_nb, log_poisson)
        return torch.logsumexp(logw + logk, dim=-1).to(out_dtype)

    def forward(self, nascent, mature, b, beta, gamma):  # noqa: D102 - nn.Module alias
        return self.log_prob_mature_given_nascent(nascent, mature, b, beta, gamma)


def load_bivi_approximator(path: str | Path, dtype: torch.dtype = torch.float32) -> BiVIConditional:
    """Load biVI's trained network (its ``.zip`` state_dict) as a conditional backend.

    Parameters
    ----------
    path
        biVI's weights file (a ``torch.save`` zip of the state_dict).
    dtype
        ``torch.float32`` (as biVI) or ``torch.float64``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file does not hold biVI's keys and shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"biVI weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state_dict")
    return BiVIConditional(state, dtype=dtype).eval()
