"""Fixtures shared by the test modules (test modules do not import from each other)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp


def _make_adata(n_cells: int = 40, n_genes: int = 12, seed: int = 0, sparse: bool = False):
    """Small count AnnData: labels NT (controls), A, B; every cell has counts."""
    rng = np.random.default_rng(seed)
    nascent = rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float32)
    mature = rng.poisson(5.0, size=(n_cells, n_genes)).astype(np.float32)
    nascent[:, 0] += 1  # no empty cells
    mature[:, 0] += 1
    labels = np.array(["NT", "A", "B", "NT"] * (n_cells // 4))
    obs = pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    conv = sp.csr_matrix if sparse else np.asarray
    return ad.AnnData(
        X=conv(mature.copy()), obs=obs, var=var,
        layers={"unspliced": conv(nascent), "spliced": conv(mature)},
    )


@pytest.fixture(scope="session")
def make_adata():
    """Factory of small count AnnData objects: ``make_adata(n_cells=40, n_genes=12, seed=0,
    sparse=False)``; labels NT (controls), A, B; every cell has counts."""
    return _make_adata
