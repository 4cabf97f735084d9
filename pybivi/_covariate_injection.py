"""Covariates into the networks, as in scVI: their sizes and the vector a module reads.

A mixin of :class:`pybivi.module.ContrastiveModule`. The covariate vector is the one-hot
batch, the one-hot categorical covariates and the continuous covariates side by side
(Lopez et al. 2018, Nat. Methods 15:1053); it is concatenated to the input of both
encoders and to the decoder's latent input, so that the latents need not carry the
covariates and the decoder can be asked for any batch. The minibatch arrays it reads
(``batch_index``, ``categorical_covariates``, ``continuous_covariates``) are made by
:func:`pybivi._covariates.covariate_arrays`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["CovariateInjection"]


class CovariateInjection:
    """The covariate sizes of a module and the covariate vector its networks read.

    Attributes
    ----------
    n_batch : int
        Number of batches (0: no batch).
    n_cats_per_covariate : tuple of int
        Number of categories of each categorical covariate.
    n_continuous_covariates : int
        Number of continuous covariates.
    encode_covariates : bool
        Whether the encoders read the covariates too (the decoder always does).
    """

    def init_covariates(
        self,
        n_batch: int,
        n_cats_per_covariate: Sequence[int],
        n_continuous_covariates: int,
        encode_covariates: bool,
    ) -> None:
        """Record and check the covariate sizes (the module's constructor calls this).

        Raises
        ------
        ValueError
            A size is negative, or a categorical covariate has no category.
        """
        self.n_batch, self.n_continuous_covariates = int(n_batch), int(n_continuous_covariates)
        self.n_cats_per_covariate = tuple(int(n) for n in n_cats_per_covariate)
        if self.n_batch < 0 or self.n_continuous_covariates < 0 or any(
            n < 1 for n in self.n_cats_per_covariate
        ):
            raise ValueError("covariate sizes must be >= 0 (>= 1 category per covariate)")
        self.encode_covariates = bool(encode_covariates)

    @property
    def n_covariates(self) -> int:
        """Width of the covariate vector the networks read (0 without covariates)."""
        return self.n_batch + sum(self.n_cats_per_covariate) + self.n_continuous_covariates

    def covariates(self, batch: dict[str, Tensor], for_decoder: bool = False) -> Tensor | None:
        """One-hot batch, one-hot categorical covariates and continuous covariates,
        ``(B, n_covariates)``; ``None`` without covariates.

        With ``for_decoder``, ``batch["decode_batch_index"]`` (when present) replaces
        the observed batch: decoding as if the cells came from that batch.
        """
        if not self.n_covariates:
            return None
        like = batch["x_mature"]
        parts = []
        if self.n_batch:
            index = batch["batch_index"]
            if for_decoder and "decode_batch_index" in batch:
                index = torch.as_tensor(batch["decode_batch_index"], device=like.device)
                index = index.expand(like.shape[0])
            parts.append(nn.functional.one_hot(index.long(), self.n_batch).to(like.dtype))
        for j, n in enumerate(self.n_cats_per_covariate):
            codes = batch["categorical_covariates"][:, j].long()
            parts.append(nn.functional.one_hot(codes, n).to(like.dtype))
        if self.n_continuous_covariates:
            parts.append(batch["continuous_covariates"].to(like.dtype))
        return torch.cat(parts, dim=-1)

    # Only a module with covariates passes them on, so that a user's encoder or decode
    # without a ``covariates`` argument keeps working.
    def encoder_covariates(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"covariates": vector}`` when the encoders read covariates, else ``{}``."""
        if self.n_covariates and self.encode_covariates:
            return {"covariates": self.covariates(batch)}
        return {}

    def decoder_covariates(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"covariates": vector}`` (at ``decode_batch_index`` when given) for
        :meth:`decode` of a module with covariates, else ``{}``."""
        return {"covariates": self.covariates(batch, True)} if self.n_covariates else {}
