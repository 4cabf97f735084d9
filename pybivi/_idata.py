"""Assembly of posterior draws into an :class:`arviz.InferenceData` (groups, dims, coords).

Private to :mod:`pybivi.posterior`, whose export fills it with the draws of
``pybivi._draws``; this module only collects, names and shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pybivi.storage import obs_labels


class DrawBuffers:
    """Preallocated arrays that the minibatches of :func:`pybivi.posterior.posterior` fill.

    ``store`` ``{quantity: (draws, library, cells, genes)}``, ``latents`` ``{name: (draws,
    cells, dims)}`` (allocated at the first batch, when the dims are known), ``observed``
    ``{species: (cells, genes)}``, ``const`` per-cell arrays in minibatch parts and
    ``replicated`` ``(draws, cells, genes, species)`` or ``None``.
    """

    def __init__(
        self,
        n_samples: int,
        libraries: Sequence[str],
        quantities: Sequence[str],
        species: Sequence[str],
        n_cells: int,
        gene_idx: np.ndarray,
        predictive: bool,
    ) -> None:
        self.n_samples, self.libraries, self.quantities = n_samples, tuple(libraries), quantities
        self.species, self.n_cells, self.gene_idx = tuple(species), n_cells, gene_idx
        shape = (n_samples, len(self.libraries), n_cells, gene_idx.size)
        self.store = {q: np.empty(shape, np.float32) for q in quantities}
        self.observed = {s: np.empty((n_cells, gene_idx.size), np.float32) for s in species}
        self.latents: dict[str, np.ndarray] = {}
        self.const: dict[str, list[np.ndarray]] = {}
        self.replicated = None
        if predictive:
            self.replicated = np.empty(
                (n_samples, n_cells, gene_idx.size, len(self.species)), np.float32
            )

    def add(self, cells: slice, batch: dict, draws: dict) -> None:
        """Copy one minibatch's latents, decoded quantities, counts and labels to ``cells``."""
        for name in ("z", "t"):
            if draws[name] is not None:
                value = draws[name].cpu().numpy()
                if name not in self.latents:
                    self.latents[name] = np.empty(
                        (self.n_samples, self.n_cells, value.shape[-1]), np.float32
                    )
                self.latents[name][:, cells] = value
        for li, lib in enumerate(self.libraries):
            for q in self.quantities:
                self.store[q][:, li, cells] = draws[lib][q].cpu().numpy()
        for s in self.species:
            self.observed[s][cells] = batch[f"x_{s}"][:, self.gene_idx].cpu().numpy()
        for key in ("library_nascent", "library_mature", "label", "is_control"):
            if key in batch:
                self.const.setdefault(key, []).append(batch[key].cpu().numpy())

    def add_replicated(self, cells: slice, counts: np.ndarray) -> None:
        """Posterior-predictive counts of one minibatch, ``(draws * cells, genes, species)``."""
        shape = (self.n_samples, -1, self.gene_idx.size, len(self.species))
        self.replicated[:, cells] = counts.reshape(shape)

    def to_inference_data(self, model, adata, rows: np.ndarray, groupby: str | None):
        """The filled buffers as an InferenceData (see :func:`to_inference_data`)."""
        return to_inference_data(
            model,
            adata,
            rows,
            self.gene_idx,
            self.libraries,
            self.store,
            self.latents,
            self.observed,
            self.const,
            self.replicated,
            groupby,
        )


def to_inference_data(
    model, adata, rows, gene_idx, libraries, store, latents, observed, const, replicated, groupby
):
    """Assemble the draws of :func:`pybivi.posterior.posterior` into an InferenceData.

    ``store`` holds ``{quantity: (draws, library, cells, genes)}``, ``latents``
    ``{name: (draws, cells, dims)}``, ``observed`` ``{species: (cells, genes)}``, ``const``
    per-cell arrays in minibatch parts, ``replicated`` the posterior-predictive counts or
    ``None``; ``rows`` and ``gene_idx`` index the exported cells and genes.
    """
    import arviz as az
    import xarray as xr

    registry = model.registry
    cells = np.asarray(adata.obs_names)[rows].astype(str)
    genes = np.asarray(registry.var_names)[gene_idx].astype(str)
    species = list(observed)
    n_draws = next(iter([*store.values(), *latents.values()])).shape[0]
    coords = {"chain": [0], "draw": np.arange(n_draws)}
    cell_gene = {"cell": cells, "gene": genes}
    post = {
        q: xr.DataArray(v[None], dims=("chain", "draw", "library", "cell", "gene"))
        for q, v in store.items()
    }
    for name, value in latents.items():
        post[name] = xr.DataArray(value[None], dims=("chain", "draw", "cell", f"{name}_latent"))
    latent_coords = {f"{k}_latent": np.arange(v.shape[-1]) for k, v in latents.items()}
    posterior_ds = xr.Dataset(
        post, coords={**coords, **cell_gene, "library": list(libraries), **latent_coords}
    )
    scheme = getattr(model.module, "scheme", None)
    if scheme is not None:
        # Lets group-level tests map pseudo-bulk means through the same kinetic map.
        posterior_ds.attrs["scheme"] = scheme.name
    if "nascent" in observed:
        obs_da = xr.DataArray(
            np.stack([observed[s] for s in species], -1), dims=("cell", "gene", "species")
        )
        obs_ds = xr.Dataset({"x": obs_da}, coords={**cell_gene, "species": species})
        site = "x"
    else:
        obs_ds = xr.Dataset({"x_mature": (("cell", "gene"), observed["mature"])}, coords=cell_gene)
        site = "x_mature"
    labels = np.asarray([*registry.labels, "unknown"], dtype=str)
    constant = {}
    for key, parts in const.items():
        value = np.concatenate(parts)
        if key == "label":
            value = labels[value]  # -1 (a label the model never saw) maps to "unknown"
        constant[key] = (("cell",), value)
    if groupby is not None:
        constant[groupby] = (("cell",), obs_labels(adata, groupby)[rows])
    theta = model.module.theta.detach().cpu().numpy()[gene_idx]
    constant["theta"] = (("gene",), theta.astype(np.float32))
    for s in ("nascent", "mature"):
        ref = registry.reference_library.get(s, float("nan"))
        constant[f"reference_library_{s}"] = ((), np.float64(ref))
    const_ds = xr.Dataset(constant, coords=cell_gene)
    groups = {"posterior": posterior_ds, "observed_data": obs_ds, "constant_data": const_ds}
    if replicated is not None:
        value = replicated if site == "x" else replicated[..., 0]
        dims = ("chain", "draw", "cell", "gene", "species")[: value.ndim + 1]
        pred = xr.DataArray(value[None], dims=dims)
        extra = {"species": species} if site == "x" else {}
        groups["posterior_predictive"] = xr.Dataset(
            {site: pred}, coords={**coords, **cell_gene, **extra}
        )
    idata = az.InferenceData(**groups)
    return idata
