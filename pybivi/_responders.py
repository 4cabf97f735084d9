"""Cells that escape their perturbation: the salient prior's two components.

A mixin of :class:`pybivi.module.ContrastiveModule` for ``salient_prior="mixture"``
(beyond the ContrastiveBiVI paper, in the spirit of Mixscape, Papalexi et al. 2021, Nat.
Genet. 53:322, and contrastiveVI+): per perturbation label ``c`` a responder component
``Normal(mu_c, I)`` and an escaper component ``Normal(0, I)``, mixed with a learned
responder share ``w_c = sigmoid(responder_logits[c])``.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["CERTAIN_LOGIT", "ResponderMixture", "responder_escaper_mixture"]

# Logit of a responder share that is 0 for all purposes (controls under the mixture prior).
CERTAIN_LOGIT = 30.0


def responder_escaper_mixture(loc: Tensor, responder_logit: Tensor) -> dist.Distribution:
    """``w Normal(loc, I) + (1 - w) Normal(0, I)`` per cell, ``w = sigmoid(responder_logit)``."""
    # Component 0 responds, component 1 escapes; log w and log(1 - w) stay finite.
    mixing = dist.Categorical(
        logits=torch.stack([F.logsigmoid(responder_logit), F.logsigmoid(-responder_logit)], -1)
    )
    locs = torch.stack([loc, torch.zeros_like(loc)], dim=-2)
    components = dist.Normal(locs, torch.ones_like(locs)).to_event(1)
    return dist.MixtureSameFamily(mixing, components, validate_args=False)


class ResponderMixture:
    """Responder probabilities of a module with ``salient_prior="mixture"``.

    The host module provides ``salient_prior_kind``, ``n_salient``, ``salient_means``,
    ``responder_logits`` and ``_salient_label(batch)``.
    """

    def salient_mask(self, batch: dict[str, Tensor]) -> Tensor | bool:
        """Cells whose ``t`` enters the ELBO: perturbed cells, or every cell with
        ``salient_prior="mixture"``.

        With the mixture, a control's ``t`` is drawn from the escaper component
        ``Normal(0, I)`` and not decoded (the decoder still sees ``t = 0``), so it leaves
        the likelihood unchanged; its KL term teaches ``q(t | x)`` to place cells that
        look like controls at 0, where the escaper component sits. Without it the
        encoder is never asked where control-like cells go, and escapers of programs
        with small salient means get middling responder probabilities.
        """
        if self.salient_prior_kind == "mixture":
            return True
        return ~batch["is_control"]

    def responder_logit(self, batch: dict[str, Tensor], label: Tensor) -> Tensor:
        """Each cell's responder logit: its label's, and ``-CERTAIN_LOGIT`` for controls,
        which are escapers for certain."""
        logit = self.responder_logits[label]
        return torch.where(batch["is_control"], torch.full_like(logit, -CERTAIN_LOGIT), logit)

    def responder_probability(self, t: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Posterior probability that ``t`` came from the responder component (mixture prior).

        ``w_c N(t; mu_c, I) / (w_c N(t; mu_c, I) + (1 - w_c) N(t; 0, I))`` per cell, for
        ``t`` of shape ``(..., B, n_salient)``; controls get 0 (they are not perturbed).

        Raises
        ------
        ValueError
            The module was not built with ``salient_prior="mixture"``.
        """
        if self.salient_prior_kind != "mixture" or not self.n_salient:
            raise ValueError(
                "responder probabilities need a model built with salient_prior='mixture'"
            )
        label = self._salient_label(batch)
        loc, logit = self.salient_means[label], self.responder_logits[label]
        # log N(t; mu, I) - log N(t; 0, I) = mu.t - |mu|^2 / 2 (the normalisers cancel).
        log_ratio = (t * loc).sum(-1) - 0.5 * (loc * loc).sum(-1)
        prob = torch.sigmoid(logit + log_ratio)
        return torch.where(batch["is_control"], torch.zeros_like(prob), prob)
