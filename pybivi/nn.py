"""Encoder and decoder networks (paper appendix C: one hidden layer of 128, ReLU,
dropout 0.1, batch normalisation, no layer normalisation)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def mlp_block(n_in: int, n_out: int, dropout: float) -> nn.Sequential:
    """Linear -> BatchNorm -> ReLU -> Dropout, the hidden layer of every network here."""
    # BatchNorm momentum/eps as in scvi-tools' FCLayers, so the baselines are comparable.
    return nn.Sequential(
        nn.Linear(n_in, n_out),
        nn.BatchNorm1d(n_out, momentum=0.01, eps=1e-3),
        nn.ReLU(),
        nn.Dropout(p=dropout),
    )


class GaussianEncoder(nn.Module):
    """Amortised diagonal Gaussian ``q(latent | counts)``.

    Parameters
    ----------
    n_input
        Number of input features (genes, or twice that for nascent + mature).
    n_latent
        Latent dimension.
    n_hidden
        Width of the hidden layer.
    dropout
        Dropout probability after the hidden layer.
    n_covariates
        Width of the covariate vector (one-hot batch and categorical covariates,
        continuous covariates) concatenated to the log counts, as in scVI; 0: none.
    """

    def __init__(
        self,
        n_input: int,
        n_latent: int,
        n_hidden: int = 128,
        dropout: float = 0.1,
        n_covariates: int = 0,
    ):
        super().__init__()
        self.n_covariates = int(n_covariates)
        self.hidden = mlp_block(n_input + self.n_covariates, n_hidden, dropout)
        self.loc = nn.Linear(n_hidden, n_latent)
        self.raw_scale = nn.Linear(n_hidden, n_latent)

    def forward(self, counts: Tensor, covariates: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return ``(loc, scale)`` for raw ``counts`` of shape ``(..., n_input)`` and,
        when the encoder has them, ``covariates`` of shape ``(..., n_covariates)``."""
        # log1p tames the heavy tails of counts (paper: the encoders see log1p counts).
        features = torch.log1p(counts)
        if self.n_covariates:
            features = torch.cat([features, _checked(covariates, self.n_covariates)], dim=-1)
        h = self.hidden(features)
        # softplus + floor keeps the scale positive without exp's overflow.
        return self.loc(h), nn.functional.softplus(self.raw_scale(h)) + 1e-4


class FrequencyDecoder(nn.Module):
    """Decoder ``f(z, t)`` to per-species normalised expression frequencies.

    Each head ends in a softmax over genes, so every frequency vector sums to one.

    Parameters
    ----------
    n_input
        Latent input size (``n_background + n_salient``).
    n_genes
        Number of genes.
    species
        Names of the frequency heads, e.g. ``("nascent", "mature")``.
    n_hidden
        Width of the hidden layer.
    zero_inflation
        Also output per cell-and-gene zero-inflation logits (head ``"zi_logits"``).
    n_covariates
        Width of the covariate vector concatenated to the latents (scVI injects the
        batch into the decoder this way); 0: none.
    """

    def __init__(
        self,
        n_input: int,
        n_genes: int,
        species: tuple[str, ...] = ("nascent", "mature"),
        n_hidden: int = 128,
        zero_inflation: bool = False,
        n_covariates: int = 0,
    ):
        super().__init__()
        self.n_covariates = int(n_covariates)
        # No dropout in the decoder (as in scvi-tools): it would only add noise to the likelihood.
        self.hidden = mlp_block(n_input + self.n_covariates, n_hidden, dropout=0.0)
        self.species = tuple(species)
        self.heads = nn.ModuleDict({s: nn.Linear(n_hidden, n_genes) for s in self.species})
        self.zi_head = nn.Linear(n_hidden, n_genes) if zero_inflation else None

    @torch.no_grad()
    def start_at_frequencies(self, frequencies: dict[str, Tensor]) -> None:
        """Start each head at given gene frequencies (its bias at their logarithm).

        With the heads' weights small at initialisation, the decoder's first output is
        close to ``frequencies`` for every cell, instead of a random vector around the
        uniform ``1 / n_genes``: a gene expressed a hundred times below the average starts
        where it belongs rather than having to be pushed there step by step.

        Parameters
        ----------
        frequencies
            ``{species: (n_genes,) positive frequencies}`` (need not sum to one; the
            softmax is invariant to a common shift of the biases).
        """
        for species, values in frequencies.items():
            if species not in self.heads:
                raise KeyError(f"the decoder has no {species!r} head (has {list(self.heads)})")
            values = torch.as_tensor(values, dtype=torch.float32)
            if values.shape != self.heads[species].bias.shape or not bool((values > 0).all()):
                raise ValueError(
                    f"{species} frequencies must be {tuple(self.heads[species].bias.shape)} "
                    "positive values"
                )
            log_freq = torch.log(values / values.sum())
            self.heads[species].bias.copy_(log_freq.to(self.heads[species].bias.device))

    def forward(self, latent: Tensor, covariates: Tensor | None = None) -> dict[str, Tensor]:
        """Return ``{"rho_<species>": frequencies, ["zi_logits": logits]}``.

        ``covariates`` (``(B, n_covariates)`` or with the latents' leading sample axes)
        is required when the decoder was built with covariates.
        """
        if self.n_covariates:
            covariates = _checked(covariates, self.n_covariates)
            lead = torch.broadcast_shapes(latent.shape[:-1], covariates.shape[:-1])
            latent = torch.cat(
                [
                    latent.expand(*lead, latent.shape[-1]),
                    covariates.to(latent.dtype).expand(*lead, self.n_covariates),
                ],
                dim=-1,
            )
        # BatchNorm1d needs (N, C): fold any leading sample axes into the batch axis.
        lead = latent.shape[:-1]
        h = self.hidden(latent.reshape(-1, latent.shape[-1]))
        out = {
            f"rho_{s}": torch.softmax(head(h), dim=-1).reshape(*lead, -1)
            for s, head in self.heads.items()
        }
        if self.zi_head is not None:
            out["zi_logits"] = self.zi_head(h).reshape(*lead, -1)
        return out


def _checked(covariates: Tensor | None, width: int) -> Tensor:
    """The covariate tensor a network built with ``width`` covariates needs."""
    if covariates is None:
        raise ValueError(
            f"this network was built with {width} covariate inputs (batch or covariates "
            "registered at setup) but none were given; pass covariates=module.covariates(batch)"
        )
    if covariates.shape[-1] != width:
        raise ValueError(f"expected {width} covariate inputs, got {covariates.shape[-1]}")
    return covariates
