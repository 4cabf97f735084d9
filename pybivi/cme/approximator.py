"""The shipped neural approximation of the bursty conditional ``P(m | n)``.

Representation
--------------
``Phat(m | n) = sum_j w_j NB(m; mean exp(L_j), shape r)``: ``K`` negative-binomial
kernels that share one shape ``r`` per pair, so the expensive ``lgamma`` terms are
computed once per pair, not once per kernel (with ten separate kernels, the ``lgamma``
work alone takes about 0.06 s per 256,000 pairs on one CPU core). The kernel log-means sit at
standard-normal nodes ``z_j`` of a *Poisson-lognormal* moment match of the mature
count given ``n``:

* the nascent rate given ``N = n`` is exactly ``Gamma(1/beta + n, scale b/(1+b))``
  (``N`` is a Poisson-Gamma mixture), which gives the mean and variance of its log;
* the rates' excess variances over Poisson (``Var - E``) give the lognormal variances
  ``log(1 + beta)`` (nascent) and ``log(1 + beta gamma / (beta + gamma))`` (mature,
  equal to the log-covariance), hence their correlation and a Gaussian regression of
  the mature log-rate on the nascent one, taken in the units of the exact Gamma
  (:func:`pybivi.cme.moments.moment_base`, ``slope="gamma"``). Where bursts are rare
  (``beta >> 1``) the nascent log-rate's true variance ``psi'(1/beta)`` is far above
  the lognormal ``log(1 + beta)``; regressing with the lognormal slope, as the earlier
  weights did (sha256 5202677a, loaded with ``slope="lognormal"``), put the kernels
  tens of nats from the conditional mean there and left the MLP a correction it could
  not fit.

As ``b -> 0`` with fixed means (``beta, gamma -> 0``) the spread vanishes and the
kernels collapse on ``Poisson(mu_M)``: the constitutive limit is in the family. A small
MLP corrects the centre, the spread, the shared shape and the kernel weights. All of it
is differentiable in ``(b, beta, gamma)``; the weights are frozen (``requires_grad`` off).

Behaviour outside the domain
----------------------------
The domain is the training box of :data:`pybivi.cme.training_data.BOX` cut by the state
cap (:func:`pybivi.cme.training_data.inside_state_cap`). For any finite positive input:

* ``b < 10**-3``: the exact small-burst limit, ``M`` independent of ``N`` and
  ``Poisson(b / gamma)`` (bursts become single molecules);
* otherwise the MLP sees its inputs clamped to the domain (``log b, log beta, log gamma``
  clamped to the box, ``n`` to ``STATE_CAP``) while the kernels keep the pair's own
  moment-matched centre and spread, so means and scales stay right;
* one :class:`UserWarning` per approximator object reports how many pairs fell outside
  (box, or ``mean + 10 sd`` of either species beyond the state cap); ``outside_count``
  keeps the running total. Results are always finite.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

from pybivi.cme.domain import BOX, STATE_CAP
from pybivi.cme.mixture import (
    PairwiseLogProb,
    heads_mixture_forward,
    nb_mixture_log_prob,
    poisson_limit,
)
from pybivi.cme.moments import (
    moment_base,
    moment_match,
    moment_match_vjp,
)
from pybivi.cme.network import ConditionalNet
from pybivi.cme.regions import B_SMALL, box_tensor

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "bursty_conditional.pt"
DEFAULT_METADATA = WEIGHTS_DIR / "bursty_conditional.json"

class BurstyConditional(nn.Module):
    """Frozen approximation of the bursty ``log P(m | n)`` (see the module docstring).

    Use :func:`load_default_approximator` rather than constructing it directly. The
    object follows its inputs' device: called with CUDA tensors it uses a copy of itself
    on that device, made once, so one shared instance serves models on any device.

    Parameters
    ----------
    net
        The trained network.
    metadata
        The weights' metadata (domain, training, held-out metrics, checksum).
    compute_dtype
        Arithmetic precision: ``torch.float32`` (default, fast) or ``torch.float64``
        (slower; removes float32 rounding of about ``1e-7 m log m`` at large counts).
    """

    follows_input_device = True  # see _for_device; models do not move it with .to()

    def __init__(
        self,
        net: ConditionalNet,
        metadata: dict | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.net = net.to(compute_dtype)
        self.compute_dtype = compute_dtype
        self.metadata = dict(metadata or {})
        self.outside_count = 0
        self._warned = False
        self._quiet = 0  # > 0 inside quiet(): count, but leave the warning to the caller
        # Copies on other devices, made on first use there (see _for_device).
        self._device_copies: dict[torch.device, BurstyConditional] = {}
        lo, hi = box_tensor()
        self.register_buffer("box_lo", lo.to(compute_dtype))
        self.register_buffer("box_hi", hi.to(compute_dtype))
        self._box_lo_linear = [math.exp(v) for v in lo.tolist()]
        self._box_hi_linear = [math.exp(v) for v in hi.tolist()]
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def domain(self) -> dict:
        """The domain the network was trained on, and the rules used outside it."""
        return {
            "box_log10": {k: list(v) for k, v in BOX.items()},
            "state_cap": STATE_CAP,
            "state_cap_rule": "1 - 1e-10 NB-matched quantile of each species below state_cap",
            "small_b": B_SMALL,
            "outside": "b < small_b: Poisson(b / gamma) independent of n; otherwise MLP inputs "
            "clamped to the box and n <= state_cap, kernels at the pair's own moments",
        }

    def _for_device(self, device: torch.device) -> BurstyConditional:
        """This approximator with its tensors on ``device``: itself, or a cached copy.

        The default approximator is one object per process, shared by every model and
        distribution; following the inputs' device (instead of being moved by ``.to``)
        lets a model on a GPU and another on the CPU use it at the same time.
        """
        device = torch.device(device)
        if self.box_lo.device == device:
            return self
        if device not in self._device_copies:
            replica = BurstyConditional(deepcopy(self.net), self.metadata, self.compute_dtype)
            self._device_copies[device] = replica.to(device).eval()
        return self._device_copies[device]

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """Within this block, pairs outside the domain are counted but not warned about.

        A model that reports its own domain diagnostics (:meth:`pybivi.BiVI.diagnostics`)
        evaluates the likelihood inside this block: the shared approximator's one warning
        is then left for direct users instead of being spent on one model's first
        (random) initialisation.
        """
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def _count_outside(self, n: Tensor, b: Tensor, beta: Tensor, gamma: Tensor) -> tuple[int, int]:
        """How many pairs fall outside the domain, and how many of them have ``b < B_SMALL``."""
        with torch.no_grad():  # bookkeeping only: no graph for it
            # the box compared on the linear scale (no logarithms: this runs on every call)
            out = torch.zeros_like(b, dtype=torch.bool)
            bounds = zip(self._box_lo_linear, self._box_hi_linear, strict=True)
            for x, (lo, hi) in zip((b, beta, gamma), bounds, strict=True):
                out |= (x < lo) | (x > hi)
            out |= n > STATE_CAP
            fano_nascent = b + 1.0
            fano_mature = (b * beta).div_(beta + gamma).add_(1.0)
            for mean, fano in ((b / beta, fano_nascent), (b / gamma, fano_mature)):
                # mean + 10 sd beyond the cap (variance = mean * Fano factor); in place on
                # the temporaries only
                out |= fano.mul_(mean).sqrt_().mul_(10.0).add_(mean) > STATE_CAP
            return int(out.sum()), int((b < B_SMALL).sum())

    def log_prob_mature_given_nascent(
        self, nascent: Tensor, mature: Tensor, b: Tensor, beta: Tensor, gamma: Tensor
    ) -> Tensor:
        """``log Phat(m | n)`` for broadcastable tensors; differentiable in ``b, beta, gamma``.

        Parameters
        ----------
        nascent, mature
            Non-negative integer counts (any numeric dtype).
        b, beta, gamma
            Burst size and splicing/degradation rates in units of the burst frequency,
            finite and positive.

        Returns
        -------
        Tensor
            Float log-probabilities of the broadcast shape, in the floating dtype of the
            inputs (computed in ``compute_dtype``, float32 by default).
        """
        dtype = next(
            (t.dtype for t in (b, beta, gamma) if torch.is_tensor(t) and t.is_floating_point()),
            torch.get_default_dtype(),
        )
        ts = torch.broadcast_tensors(
            *(torch.as_tensor(t) for t in (nascent, mature, b, beta, gamma))
        )
        n, m, b, beta, gamma = (t.to(self.compute_dtype) for t in ts)
        impl = self._for_device(b.device)
        tally: list[tuple[int, int]] = []  # (outside, small-burst) per chunk of pairs
        shape = n.shape
        out = PairwiseLogProb.apply(
            impl, tally, *(t.reshape(-1) for t in (n, m, b, beta, gamma))
        ).reshape(shape)
        n_out = sum(count for count, _ in tally)
        if n_out:
            self.outside_count += n_out
            if not self._warned and not self._quiet:
                self._warned = True
                warnings.warn(
                    f"{n_out} of {out.numel()} (n, m) pairs fell outside the approximator's "
                    f"domain ({sum(small for _, small in tally)} with b < {B_SMALL}: "
                    "small-burst Poisson limit; others: clamped network inputs). Further "
                    "counts accumulate in `outside_count` without warnings.",
                    UserWarning,
                    stacklevel=2,
                )
        return out.to(dtype)

    def _mlp_weights(self) -> list[Tensor]:
        """``[W_1, b_1[:, None], ...]``: the frozen MLP's layers for feature-major inputs."""
        layers = [mod for mod in self.net.mlp if isinstance(mod, nn.Linear)]
        return [t for lin in layers for t in (lin.weight.detach(), lin.bias.detach()[:, None])]

    @property
    def fused_relu(self) -> bool:
        """Whether the closed-form network backward applies (ReLU hidden layers)."""
        return isinstance(self.net.mlp[1], nn.ReLU)

    small_burst = B_SMALL

    def _network_inputs(
        self, n: Tensor, b: Tensor, beta: Tensor, gamma: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """MLP inputs ``(pairs, 7)`` and the moment match ``(c, sigma)``, differentiable."""
        _, clamped = self._clamped_logs(b, beta, gamma)
        c, sigma = moment_base(n, b, beta, gamma, self.net.moment_slope)
        feats = self.net.features(n.clamp(max=STATE_CAP), *clamped, c, sigma)
        return feats, c, sigma

    def _clamped_logs(self, *params: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """``log b, log beta, log gamma`` and the same clamped to the training box."""
        logs = [torch.log(x) for x in params]
        bounds = zip(self.box_lo, self.box_hi, strict=True)
        return logs, [x.clamp(lo, hi) for x, (lo, hi) in zip(logs, bounds, strict=True)]

    def _network_inputs_vjp(self, n: Tensor, b: Tensor, beta: Tensor, gamma: Tensor):
        """:meth:`_network_inputs` (no graph) and a function for its vector-Jacobian product.

        Returns ``(feats, c, sigma, vjp)``; ``vjp(g_feats, g_c, g_sigma)`` gives the
        gradients of ``sum(g_feats * feats) + sum(g_c * c) + sum(g_sigma * sigma)`` with
        respect to ``(b, beta, gamma)``: the moment match in closed form
        (:func:`~pybivi.cme.moments.moment_match_vjp`), the features (a few linear maps
        and a log) by autograd on their own small graph, the clamps to the box as masks.
        """
        match = moment_match(n, b, beta, gamma, self.net.moment_slope)
        logs, clamped = self._clamped_logs(b, beta, gamma)
        inside = [c == x for c, x in zip(clamped, logs, strict=True)]
        with torch.enable_grad():
            leaves = [x.requires_grad_(True) for x in (*clamped, match.c, match.sigma)]
            feats = self.net.features(n.clamp(max=STATE_CAP), *leaves)

        def vjp(g_feats: Tensor, g_c: Tensor, g_sigma: Tensor) -> tuple[Tensor, ...]:
            g_logs = torch.autograd.grad(feats, leaves, g_feats)
            grads = moment_match_vjp(match, g_c + g_logs[3], g_sigma + g_logs[4])
            return tuple(
                g.addcdiv_(g_log * mask, x)  # d log x / dx = 1 / x, where not clamped
                for g, g_log, mask, x in zip(
                    grads, g_logs[:3], inside, (b, beta, gamma), strict=True
                )
            )

        return feats.detach(), match.c, match.sigma, vjp

    def _pairs_log_prob(self, n: Tensor, m: Tensor, b: Tensor, beta: Tensor, gamma: Tensor):
        """``log Phat(m | n)`` for one block of pairs (1-D tensors in ``compute_dtype``).

        The plain autograd-traceable computation (values only, without gradient recording,
        by the fused forward of a ReLU network); :class:`PairwiseLogProb` runs it on
        cache-sized blocks when no gradient is needed or the network is not ReLU.
        """
        feats, c, sigma = self._network_inputs(n, b, beta, gamma)
        if self.fused_relu and not torch.is_grad_enabled():
            out, _ = heads_mixture_forward(feats.t(), c, sigma, m, self.net, self._mlp_weights())
        else:
            log_means, logw, log_r = self.net.heads(feats, c, sigma)
            out = nb_mixture_log_prob(m, log_means, logw, log_r)
        small = b < B_SMALL
        if bool(small.any()):
            out = torch.where(small, poisson_limit(m, b, gamma), out)
        return out

    def forward(self, nascent, mature, b, beta, gamma):  # noqa: D102 - alias for nn.Module use
        return self.log_prob_mature_given_nascent(nascent, mature, b, beta, gamma)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_approximator(net: ConditionalNet, out_dir: Path, metadata: dict) -> Path:
    """Write ``bursty_conditional.pt`` and its metadata JSON (with the checksum) to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / DEFAULT_WEIGHTS.name
    state = {k: v.detach().cpu().float() for k, v in net.state_dict().items()}
    torch.save({"config": net.config, "state_dict": state}, path)
    meta = dict(metadata)
    meta["config"] = net.config
    meta["sha256"] = sha256_of(path)
    meta["weights_file"] = path.name
    (out_dir / DEFAULT_METADATA.name).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def load_approximator(
    path: str | Path, verify: bool = True, compute_dtype: torch.dtype = torch.float32
) -> BurstyConditional:
    """Load an approximator written by :func:`save_approximator`.

    Parameters
    ----------
    path
        The ``.pt`` weights file; its metadata JSON must sit beside it.
    verify
        Check the file's SHA-256 against the metadata (raises ``ValueError`` on mismatch).
    compute_dtype
        Arithmetic precision of the returned object (see :class:`BurstyConditional`).
    """
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"approximator weights or metadata missing: {path}, {meta_path}")
    meta = json.loads(meta_path.read_text())
    if verify and sha256_of(path) != meta.get("sha256"):
        raise ValueError(
            f"checksum mismatch for {path}: the weights file does not match its metadata"
        )
    blob = torch.load(path, map_location="cpu", weights_only=True)
    # defaults of files written before each option existed
    config = {"activation": "silu", "moment_slope": "lognormal", **blob["config"]}
    net = ConditionalNet(**config)
    net.load_state_dict(blob["state_dict"])
    net.eval()
    return BurstyConditional(net, meta, compute_dtype).eval()


@lru_cache(maxsize=1)
def load_default_approximator() -> BurstyConditional:
    """The shipped approximator, loaded once per process and checksum-verified."""
    return load_approximator(DEFAULT_WEIGHTS)
