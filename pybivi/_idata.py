"""Assembly of posterior draws into an :class:`arviz.InferenceData` (groups, dims, coords).

Private to :mod:`pybivi.posterior`, which draws; this module only names and shapes.
"""

from __future__ import annotations

import numpy as np


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
        constant[groupby] = (("cell",), adata.obs[groupby].astype(str).to_numpy()[rows])
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
