"""User-facing models: ContrastiveBiVI, BiVI, SCVI and ContrastiveVI.

All four wrap the same :class:`pybivi.module.ContrastiveModule` with different
arguments (salient latents or not, bivariate CME or univariate mature likelihood).

Typical use::

    pybivi.ContrastiveBiVI.setup_anndata(adata, perturbation_key="perturbation",
                                         control_labels=("NT",))
    model = pybivi.ContrastiveBiVI(adata, n_background=10, n_salient=10, scheme="bursty")
    model.train(max_epochs=100)
    salient = model.get_latent_representation(kind="salient")

Contract (relied on by :mod:`pybivi.posterior`, :mod:`pybivi.tl.de`, :mod:`pybivi.tl.ppc`)
------------------------------------------------------------------------------------
* ``model.module``: the Pyro module (see :mod:`pybivi.module` for its methods), an
  instance of the class attribute ``module_cls`` or of the ``module_cls=`` argument.
* ``model.registry``: a :class:`pybivi.registry.Registry` (``n_cells``, ``n_genes``,
  ``obs_names``, ``var_names``, ``labels``, ``control_labels``, ``perturbation_key``,
  ``reference_library`` = per-species median library of the training cells).
* ``model.make_batches(adata=None, indices=None, batch_size=128)``: iterator of batch
  dictionaries (:mod:`pybivi.data`) on ``model.device``; a different AnnData must have
  the registered genes.
* ``model.device``, ``model.history`` (a DataFrame, one row per epoch).
* ``model.get_latent_representation(adata=None, kind=..., give_mean=True)``; the
  salient representation of a control cell is 0.

Library size: per species, the observed total nascent (resp. mature) count of the
cell; ``mu_N = l^N rho_N`` and ``mu_M = l^M rho_M``.
"""

from __future__ import annotations

from typing import Any

from pybivi.models._escapers import EscaperMixin
from pybivi.models.base import BaseModel
from pybivi.module import ContrastiveModule

__all__ = ["ContrastiveBiVI", "BiVI", "SCVI", "ContrastiveVI", "BaseModel"]


class ContrastiveBiVI(EscaperMixin, BaseModel):
    """ContrastiveBiVI: background ``z`` and salient ``t`` latents, nascent + mature counts
    through a reaction-scheme likelihood (paper section 3).

    Parameters
    ----------
    adata
        AnnData prepared by :meth:`setup_anndata`.
    n_background, n_salient
        Dimensions of ``z`` and ``t`` (paper: 10 and 10).
    n_hidden
        Hidden width of encoders and decoder (paper: 128).
    scheme
        Reaction scheme: ``"bursty"`` (paper), ``"constitutive"``, ``"extrinsic"`` or a
        :class:`pybivi.schemes.base.ReactionScheme` object.
    dropout
        Encoder dropout (paper: 0.1).
    seed
        Seed of the weight initialisation.
    module_cls
        Class of the Pyro module to build: :class:`pybivi.module.ContrastiveModule`
        (default) or a subclass with its own prior, likelihood, decoder or guide.
        :meth:`save` stores its import path and :meth:`load` imports it again.
    module_kwargs
        Extra constructor arguments of ``module_cls`` (JSON values, so that the model can
        be saved).
    frequency_init
        How the decoder's gene frequencies start: ``"data"`` (each head's bias at the log
        of the gene's share of that species' counts in the training cells, so rare genes
        start rare), ``"random"`` (the paper and scvi-tools: PyTorch's default
        initialisation, near-uniform frequencies) or ``"auto"`` (default: ``"data"`` when
        the module's decoder has ``start_at_frequencies``, as pybivi's does, else
        ``"random"``). Starting at the data's frequencies gives better fits in the same
        number of steps, on real and simulated screens (benchmarks page).
    salient_prior
        ``"normal"`` (the paper): ``t ~ Normal(mu_c, I)``. ``"mixture"`` (beyond the
        paper): ``t ~ w_c Normal(mu_c, I) + (1 - w_c) Normal(0, I)``, a learned share
        ``w_c`` of responders per label and cells that escape their perturbation at 0
        (user guide, "Escapers"); then :meth:`get_perturbation_probability` gives each
        cell's probability of responding and the differential tests use the responders.
        Saved and loaded with the model.
    """

    _use_nascent, _contrastive = True, True
    _label_prior_name = "normal"

    def __init__(
        self,
        adata: Any,
        n_background: int = 10,
        n_salient: int = 10,
        n_hidden: int = 128,
        scheme: Any = "bursty",
        dropout: float = 0.1,
        seed: int = 0,
        module_cls: type[ContrastiveModule] | None = None,
        module_kwargs: dict[str, Any] | None = None,
        frequency_init: str = "auto",
        salient_prior: str = "normal",
    ) -> None:
        if salient_prior not in ("normal", "mixture"):
            raise ValueError(
                "ContrastiveBiVI salient_prior must be 'normal' or 'mixture', "
                f"got {salient_prior!r}"
            )
        # The module calls the paper's per-label normal prior "label".
        prior = "label" if salient_prior == "normal" else "mixture"
        kwargs = dict(n_background=n_background, n_salient=n_salient, n_hidden=n_hidden,
                      dropout=dropout, likelihood="cme", scheme=scheme, salient_prior=prior)
        self._build(adata, kwargs, seed, module_cls, module_kwargs, frequency_init)


class BiVI(BaseModel):
    """biVI: one latent ``z``, nascent + mature counts, reaction-scheme likelihood.

    Parameters are as in :class:`ContrastiveBiVI` (``module_cls``, ``module_kwargs`` and
    ``frequency_init`` included), with ``n_latent`` the dimension of ``z``.
    Perturbation labels are optional.
    """

    _use_nascent, _contrastive = True, False

    def __init__(
        self,
        adata: Any,
        n_latent: int = 10,
        n_hidden: int = 128,
        scheme: Any = "bursty",
        dropout: float = 0.1,
        seed: int = 0,
        module_cls: type[ContrastiveModule] | None = None,
        module_kwargs: dict[str, Any] | None = None,
        frequency_init: str = "auto",
    ) -> None:
        kwargs = dict(n_background=n_latent, n_salient=0, n_hidden=n_hidden, dropout=dropout,
                      likelihood="cme", scheme=scheme, salient_prior="label")
        self._build(adata, kwargs, seed, module_cls, module_kwargs, frequency_init)


class SCVI(BaseModel):
    """scVI: one latent ``z``, mature counts only, ``"zinb"`` (paper) or ``"nb"`` likelihood.

    Perturbation labels are optional; ``nascent_layer`` is ignored at setup.
    ``module_cls``, ``module_kwargs`` and ``frequency_init`` are as in :class:`ContrastiveBiVI`.
    """

    _use_nascent, _contrastive = False, False

    def __init__(
        self,
        adata: Any,
        n_latent: int = 10,
        n_hidden: int = 128,
        likelihood: str = "zinb",
        dropout: float = 0.1,
        seed: int = 0,
        module_cls: type[ContrastiveModule] | None = None,
        module_kwargs: dict[str, Any] | None = None,
        frequency_init: str = "auto",
    ) -> None:
        if likelihood not in ("nb", "zinb"):
            raise ValueError(f"SCVI likelihood must be 'nb' or 'zinb', got {likelihood!r}")
        kwargs = dict(n_background=n_latent, n_salient=0, n_hidden=n_hidden, dropout=dropout,
                      likelihood=likelihood, scheme=None, salient_prior="label")
        self._build(adata, kwargs, seed, module_cls, module_kwargs, frequency_init)


class ContrastiveVI(EscaperMixin, BaseModel):
    """contrastiveVI: background ``z`` and salient ``t``, mature counts only, (ZI)NB.

    ``salient_prior="standard"`` (default, as in scvi-tools) uses ``t ~ Normal(0, I)``;
    ``"label"`` learns a mean per perturbation label as ContrastiveBiVI does;
    ``"mixture"`` (beyond the paper) adds an escaper component at 0 with a learned
    responder share per label, as ``ContrastiveBiVI(salient_prior="mixture")``.
    ``module_cls``, ``module_kwargs`` and ``frequency_init`` are as in :class:`ContrastiveBiVI`.
    """

    _use_nascent, _contrastive = False, True

    def __init__(
        self,
        adata: Any,
        n_background: int = 10,
        n_salient: int = 10,
        n_hidden: int = 128,
        likelihood: str = "zinb",
        salient_prior: str = "standard",
        dropout: float = 0.1,
        seed: int = 0,
        module_cls: type[ContrastiveModule] | None = None,
        module_kwargs: dict[str, Any] | None = None,
        frequency_init: str = "auto",
    ) -> None:
        if likelihood not in ("nb", "zinb"):
            raise ValueError(f"ContrastiveVI likelihood must be 'nb' or 'zinb', got {likelihood!r}")
        kwargs = dict(n_background=n_background, n_salient=n_salient, n_hidden=n_hidden,
                      dropout=dropout, likelihood=likelihood, scheme=None,
                      salient_prior=salient_prior)
        self._build(adata, kwargs, seed, module_cls, module_kwargs, frequency_init)
