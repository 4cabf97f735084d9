"""The machinery shared by the model classes: setup, data, latents and the posterior.

Training and scoring are in :mod:`pybivi.models._training`, saving and loading in
:mod:`pybivi.models._io`; both are mixins of :class:`BaseModel`.

See :mod:`pybivi.models` for the classes and the contract they keep.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from pyro import poutine

from pybivi import data as _data
from pybivi import registry as _registry
from pybivi.models._io import SaveLoadMixin, check_module_cls
from pybivi.models._training import TrainingMixin
from pybivi.module import ContrastiveModule

__all__ = ["BaseModel"]

_RESERVED = (
    "n_genes", "n_labels", "n_cells", "n_batch", "n_cats_per_covariate", "n_continuous_covariates"
)


#: how the decoder's gene frequencies start (the ``frequency_init`` of the model classes)
FREQUENCY_INITS = ("auto", "data", "random")


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available")
    return device


class BaseModel(SaveLoadMixin, TrainingMixin):
    """Shared machinery of the four model classes (subclasses set the module arguments).

    Training and scoring (:meth:`train`, :meth:`elbo`, :meth:`diagnostics`) come from
    :class:`~pybivi.models._training.TrainingMixin`, saving and loading from
    :class:`~pybivi.models._io.SaveLoadMixin`.
    """

    #: whether the model reads nascent counts
    _use_nascent: bool = True
    #: whether the model has salient latents (needs controls and perturbed cells)
    _contrastive: bool = True
    #: the module class built by the constructor (a subclass may set its own)
    module_cls: type[ContrastiveModule] = ContrastiveModule

    @classmethod
    def setup_anndata(
        cls,
        adata: Any,
        perturbation_key: str | None = "perturbation",
        control_labels: Sequence[str] | str = ("NT",),
        nascent_layer: str | None = "unspliced",
        mature_layer: str | None = "spliced",
        batch_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
    ) -> None:
        """Validate ``adata`` and register where the counts, labels and covariates are.

        Parameters
        ----------
        adata
            AnnData with raw counts (dense or scipy sparse).
        perturbation_key
            ``obs`` column of perturbation labels (required by contrastive models;
            optional otherwise).
        control_labels
            Label(s) of control cells.
        nascent_layer, mature_layer
            Layers of nascent (unspliced) and mature (spliced) counts; ``None`` is
            ``adata.X``. Mature-only models ignore ``nascent_layer``.
        batch_key
            ``obs`` column of the batch, as in scvi-tools: the one-hot batch is
            concatenated to the inputs of the encoders and of the decoder, so latents
            are corrected for it and decoded quantities can be read at any batch
            (``transform_batch=``).
        categorical_covariate_keys
            Further categorical ``obs`` columns, injected one-hot like the batch.
        continuous_covariate_keys
            Numeric ``obs`` columns, injected as values.

        Raises
        ------
        KeyError, ValueError
            Missing layer, key or covariate column; negative, non-integer, NaN or
            mismatched counts; an empty cell; a control label that never occurs; no
            control or no perturbed cells; missing categories or NaN covariate values.
        """
        _registry.setup_anndata(
            adata,
            perturbation_key=perturbation_key,
            control_labels=control_labels,
            nascent_layer=nascent_layer,
            mature_layer=mature_layer,
            use_nascent=cls._use_nascent,
            contrastive=cls._contrastive,
            batch_key=batch_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
        )

    def _build(
        self,
        adata: Any,
        module_kwargs: dict[str, Any],
        seed: int,
        module_cls: type[ContrastiveModule] | None = None,
        extra_kwargs: dict[str, Any] | None = None,
        frequency_init: str = "auto",
    ) -> None:
        """Register ``adata`` and build the module.

        ``module_kwargs`` are the arguments the model class sets; ``extra_kwargs`` (the
        user's ``module_kwargs=``) go to a custom ``module_cls`` on top of them.
        """
        if frequency_init not in FREQUENCY_INITS:
            raise ValueError(
                f"frequency_init must be one of {FREQUENCY_INITS}, got {frequency_init!r}"
            )
        module_cls = check_module_cls(self.module_cls if module_cls is None else module_cls)
        extra = dict(extra_kwargs or {})
        clash = sorted(set(extra) & (set(module_kwargs) | set(_RESERVED) | {"seed"}))
        if clash:
            raise ValueError(
                f"module_kwargs repeats arguments that the model sets itself: {clash}; pass "
                "them to the model class instead"
            )
        registry = _registry.make_registry(adata)
        name = type(self).__name__
        if registry.use_nascent != self._use_nascent:
            kind = "bimodal" if registry.use_nascent else "mature-only"
            raise ValueError(
                f"the AnnData was set up for a {kind} model; call {name}.setup_anndata(adata) first"
            )
        if self._contrastive and registry.perturbation_key is None:
            raise ValueError(f"{name} needs perturbation labels; call {name}.setup_anndata first")
        self._init_kwargs = {**module_kwargs, "seed": seed}
        self._module_cls, self._module_kwargs = module_cls, extra
        self.registry = registry
        self.adata = adata
        self._cells = _data.CellData(adata, registry, check=False)
        # Seeded initialisation: the same seed gives the same model on the same machine.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = self._make_module(module_kwargs)
        decoder = getattr(self.module, "decoder", None)
        if frequency_init == "data" or (
            frequency_init == "auto" and hasattr(decoder, "start_at_frequencies")
        ):
            self._start_at_data_frequencies()
        self.device = torch.device("cpu")
        self.history = pd.DataFrame(
            columns=["epoch", "train_loss", "kl_weight", "validation_loss"]
        )
        self.is_trained = False
        #: cells trained on and held out by the last :meth:`train` (``None`` before it)
        self.train_indices: np.ndarray | None = None
        self.validation_indices: np.ndarray | None = None
        #: :meth:`diagnostics` at the end of the last training run (bursty models)
        self.training_diagnostics: pd.DataFrame | None = None

    def _start_at_data_frequencies(self) -> None:
        """``frequency_init="data"``: the decoder starts at each gene's share of the counts."""
        decoder = getattr(self.module, "decoder", None)
        if not hasattr(decoder, "start_at_frequencies"):
            raise ValueError(
                'frequency_init="data" needs a decoder with start_at_frequencies() (as '
                f"pybivi.nn.FrequencyDecoder); {type(self.module).__name__}'s decoder has none"
            )
        totals = self._cells.gene_totals()
        # Half a count per gene keeps genes never seen in these cells at a finite log.
        decoder.start_at_frequencies(
            {s: t + 0.5 for s, t in totals.items() if s in decoder.heads}
        )

    def _make_module(self, module_kwargs: dict[str, Any]) -> ContrastiveModule:
        registry = self.registry
        return self._module_cls(
            n_genes=registry.n_genes,
            n_labels=len(registry.labels),
            n_cells=registry.n_cells,
            **registry.covariate_sizes(),
            **module_kwargs,
            **self._module_kwargs,
        )

    def __repr__(self) -> str:
        m, reg = self.module, self.registry
        custom = "" if type(m) is ContrastiveModule else f", module_cls={type(m).__name__}"
        return (
            f"{type(self).__name__}(n_cells={reg.n_cells}, n_genes={reg.n_genes}{custom}"
            f", n_background={m.n_background}, n_salient={m.n_salient}, likelihood={m.likelihood!r}"
            f", scheme={getattr(m.scheme, 'name', None)!r}, trained={self.is_trained})"
        )

    # ------------------------------------------------------------------ data
    def make_batches(
        self,
        adata: Any = None,
        indices: np.ndarray | Sequence[int] | None = None,
        batch_size: int = 128,
        shuffle: bool = False,
        rng: np.random.Generator | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batch dictionaries (see :mod:`pybivi.data`) of ``adata`` (default: the training data).

        Raises
        ------
        ValueError
            ``adata`` does not have the registered genes, or its counts are invalid.
        """
        cells = self._cells if adata is None or adata is self.adata else self._cell_data(adata)
        idx = None if indices is None else np.asarray(indices, dtype=np.int64)
        return cells.iterate(idx, batch_size, shuffle=shuffle, rng=rng, device=self.device)

    def _cell_data(self, adata: Any) -> _data.CellData:
        return _data.CellData(adata, self.registry, check=True)

    @property
    def shuffle_block_size(self) -> int | None:
        """Contiguous rows per shuffled training block; ``None`` shuffles single cells.

        Default: ``None`` when the counts are in memory,
        :data:`pybivi.storage.DEFAULT_BLOCK_SIZE` when they stay on disk (see
        :class:`pybivi.data.CellData`). Set it before :meth:`train`.
        """
        return self._cells.block_size

    @shuffle_block_size.setter
    def shuffle_block_size(self, value: int | None) -> None:
        self._cells.block_size = value

    def to(self, device: str | torch.device) -> BaseModel:
        """Move the module to ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``...)."""
        self.device = _resolve_device(device)
        self.module.to(self.device)
        return self

    # ---------------------------------------------------------------- latents
    @torch.no_grad()
    def get_latent_representation(
        self,
        adata: Any = None,
        kind: str | None = None,
        give_mean: bool = True,
        batch_size: int = 1024,
    ) -> np.ndarray:
        """Posterior latent representation of each cell.

        Parameters
        ----------
        adata
            Cells to embed (default: the training data); must have the registered genes.
        kind
            ``"salient"`` (``t``; 0 for control cells) or ``"background"`` (``z``). Default:
            ``"salient"`` for contrastive models, ``"background"`` for single-latent ones
            (which only accept ``"background"``).
        give_mean
            Posterior mean; otherwise one draw from ``q``.
        batch_size
            Cells per forward pass.

        Returns
        -------
        numpy.ndarray
            ``(n_cells, n_latent)`` float32.
        """
        has_t = self.module.n_salient > 0
        kind = kind if kind is not None else ("salient" if has_t else "background")
        if kind not in ("salient", "background"):
            raise ValueError(f"kind must be 'salient' or 'background', got {kind!r}")
        if kind == "salient" and not has_t:
            raise ValueError(f"{type(self).__name__} has no salient latents; use kind='background'")
        # Through the guide and the model: the model's "salient" site applies the control
        # rule (t = 0), and a user's own guide is honoured. The mean replays the model on
        # the guide's means; the global RNG is left as it was.
        site = "salient" if kind == "salient" else "z"
        module = self.module
        was_training = module.training
        module.eval()
        out = []
        with contextlib.ExitStack() as stack:
            if give_mean:
                devices = [self.device] if self.device.type == "cuda" else []
                stack.enter_context(torch.random.fork_rng(devices=devices))
            for batch in self.make_batches(adata, batch_size=batch_size):
                guide_trace = poutine.trace(module.guide).get_trace(batch)
                if give_mean:
                    for name in ("z", "t"):
                        if name in guide_trace.nodes:
                            node = guide_trace.nodes[name]
                            node["value"] = node["fn"].mean
                model = poutine.trace(poutine.replay(module.model, trace=guide_trace))
                out.append(model.get_trace(batch).nodes[site]["value"].cpu().numpy())
        module.train(was_training)
        return np.concatenate(out, axis=0).astype(np.float32)

    def posterior(self, adata: Any = None, indices: Any = None, n_samples: int = 25, **kwargs: Any):
        """Posterior draws as an :class:`arviz.InferenceData`.

        A method form of :func:`pybivi.posterior.posterior` (see there for every option:
        ``groupby``, ``groups``, ``quantities``, ``libraries``, ``genes``,
        ``posterior_predictive``, ``batch_size``, ``seed``).

        Parameters
        ----------
        adata
            AnnData to draw for (default: the training data).
        indices
            Rows of ``adata`` (default: all cells).
        n_samples
            Draws per cell from the guide.
        **kwargs
            Passed on to :func:`pybivi.posterior.posterior`.

        Returns
        -------
        arviz.InferenceData
            Groups ``posterior``, ``observed_data``, ``constant_data`` and optionally
            ``posterior_predictive``, with coordinates from the AnnData.
        """
        from pybivi.posterior import posterior

        return posterior(self, adata, indices, n_samples, **kwargs)
