"""``frequency_init="data"``: the decoder starts at the genes' shares of the counts."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import pybivi
from pybivi.module import ContrastiveModule


def _skewed_adata(n_cells: int = 64, n_genes: int = 40, seed: int = 0) -> ad.AnnData:
    """Gene means spread over three orders of magnitude, as in real data."""
    rng = np.random.default_rng(seed)
    scale = np.logspace(-1.5, 1.5, n_genes)
    rng.shuffle(scale)
    nascent = rng.poisson(0.5 * scale, size=(n_cells, n_genes)).astype(np.float32)
    mature = rng.poisson(scale, size=(n_cells, n_genes)).astype(np.float32)
    nascent[:, 0] += 1
    mature[:, 0] += 1
    labels = np.array(["NT", "A"] * (n_cells // 2))
    obs = pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(n_cells)])
    return ad.AnnData(
        X=mature.copy(), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
        layers={"unspliced": nascent, "spliced": mature},
    )


def _decoded_log_frequencies(model) -> dict[str, np.ndarray]:
    model.module.eval()
    with torch.no_grad():
        batch = next(model.make_batches(batch_size=64))
        latent = torch.zeros(len(batch["index"]), model.module.decoder.hidden[0].in_features)
        out = model.module.decoder(latent)
    return {k[4:]: np.log(v.mean(0).numpy()) for k, v in out.items() if k.startswith("rho_")}


@pytest.mark.parametrize("cls", [pybivi.BiVI, pybivi.ContrastiveBiVI, pybivi.SCVI])
def test_the_untrained_decoder_starts_at_the_data_frequencies(cls):
    adata = _skewed_adata()
    cls.setup_anndata(adata, perturbation_key="perturbation", control_labels=["NT"])
    data = cls(adata, frequency_init="data", seed=0)
    default = cls(adata, frequency_init="random", seed=0)
    auto = cls(adata, seed=0)
    layers = {"nascent": "unspliced", "mature": "spliced"}
    for species, decoded in _decoded_log_frequencies(data).items():
        totals = np.asarray(adata.layers[layers[species]].sum(0)) + 0.5
        empirical = np.log(totals / totals.sum())
        # Three decades of spread against the heads' initial noise: nearly a straight line.
        assert np.corrcoef(decoded, empirical)[0, 1] > 0.95
        assert abs(np.mean(decoded - empirical)) < 0.5
        random_start = _decoded_log_frequencies(default)[species]
        assert abs(np.corrcoef(random_start, empirical)[0, 1]) < 0.6
        # The default ("auto") starts pybivi's decoder at the data, as "data" does.
        np.testing.assert_allclose(_decoded_log_frequencies(auto)[species], decoded, atol=1e-5)


def test_frequency_init_is_checked(make_adata):
    adata = make_adata()
    pybivi.BiVI.setup_anndata(adata)
    with pytest.raises(ValueError, match="frequency_init must be one of"):
        pybivi.BiVI(adata, frequency_init="mean")


class _NoFrequencyDecoder(ContrastiveModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.decoder = torch.nn.Identity()


def test_a_decoder_without_frequency_heads_is_named(make_adata):
    adata = make_adata()
    pybivi.BiVI.setup_anndata(adata)
    with pytest.raises(ValueError, match="start_at_frequencies"):
        pybivi.BiVI(adata, frequency_init="data", module_cls=_NoFrequencyDecoder)
    # The default falls back to the module's own initialisation for such a decoder.
    assert isinstance(pybivi.BiVI(adata, module_cls=_NoFrequencyDecoder).module.decoder,
                      torch.nn.Identity)


def test_start_at_frequencies_rejects_bad_values():
    from pybivi.nn import FrequencyDecoder

    decoder = FrequencyDecoder(n_input=4, n_genes=3, species=("mature",))
    with pytest.raises(ValueError, match="positive"):
        decoder.start_at_frequencies({"mature": np.array([1.0, 0.0, 2.0])})
    with pytest.raises(KeyError, match="no 'nascent' head"):
        decoder.start_at_frequencies({"nascent": np.ones(3)})
