"""Cells that escape their perturbation: responder probabilities of mixture-prior models.

A CRISPRi/a cell may carry a guide and show no effect (too little knock-down, a guide that
does not cut). With ``salient_prior="mixture"`` the salient prior of each perturbation
label is a two-component mixture, a responder component ``Normal(mu_c, I)`` and an escaper
component ``Normal(0, I)`` (the controls' salient state), with a learned responder share
``w_c``; :meth:`EscaperMixin.get_perturbation_probability` gives each cell's posterior
probability of responding. This goes beyond the ContrastiveBiVI paper, whose prior is the
responder component alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pyro import poutine

__all__ = ["EscaperMixin"]


class EscaperMixin:
    """Responder probabilities for the contrastive models (``salient_prior="mixture"``)."""

    #: what the model class calls the module's per-label normal prior ``"label"``
    _label_prior_name = "label"

    @property
    def salient_prior(self) -> str:
        """The salient prior the model was built with (``"mixture"`` for escaper models)."""
        kind = getattr(self.module, "salient_prior_kind", "label")
        return self._label_prior_name if kind == "label" else kind

    @torch.no_grad()
    def get_perturbation_probability(
        self,
        adata: Any = None,
        indices: np.ndarray | Sequence[int] | None = None,
        n_samples: int = 25,
        batch_size: int = 1024,
        seed: int = 0,
    ) -> np.ndarray:
        """Each cell's posterior probability of responding to its perturbation.

        ``E_q(t | x)[ w_c N(t; mu_c, I) / (w_c N(t; mu_c, I) + (1 - w_c) N(t; 0, I)) ]``,
        averaged over ``n_samples`` draws of the salient posterior ``q(t | x)``; ``w_c``
        and ``mu_c`` are the learned responder share and salient mean of the cell's label.
        Control cells get 0: they carry no perturbation to respond to (so the result can
        be used as weights directly; select controls by their label, not by this value).

        Parameters
        ----------
        adata
            Cells to score (default: the training data); must have the registered genes.
        indices
            Rows of ``adata`` (default: all cells).
        n_samples
            Draws of ``t`` per cell.
        batch_size
            Cells per forward pass.
        seed
            Seed of the draws (the global random state is restored).

        Returns
        -------
        numpy.ndarray
            ``(n_cells,)`` float64 probabilities in ``[0, 1]``, in the order of the rows.

        Raises
        ------
        ValueError
            The model was built without ``salient_prior="mixture"``, or ``n_samples < 1``.
        """
        if getattr(self.module, "salient_prior_kind", None) != "mixture":
            raise ValueError(
                f"get_perturbation_probability needs a model built with "
                f"salient_prior='mixture'; this {type(self).__name__} has "
                f"salient_prior={self.salient_prior!r}"
            )
        if int(n_samples) < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        module = self.module
        was_training = module.training
        module.eval()
        out = []
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                for batch in self.make_batches(adata, indices=indices, batch_size=batch_size):
                    # Through the guide, so that a user's own q(t | x) is honoured.
                    q_t = poutine.trace(module.guide).get_trace(batch).nodes["t"]["fn"]
                    draws = q_t.sample((int(n_samples),))
                    prob = module.responder_probability(draws, batch).mean(0)
                    out.append(prob.double().cpu().numpy())
        finally:
            module.train(was_training)
        return np.concatenate(out) if out else np.zeros(0)
