"""The shared bursty approximator follows its inputs' device instead of being moved.

No GPU is needed: PyTorch's ``meta`` device stands in for a second device (tensors with
shapes and dtypes but no data), which is enough to see where each object's tensors live.
"""

from __future__ import annotations

import torch

import pybivi
from pybivi.cme import load_default_approximator


def test_a_copy_per_device_and_the_shared_object_stays_put():
    approx = load_default_approximator()
    here = approx.box_lo.device
    other = approx._for_device(torch.device("meta"))
    assert other is not approx
    assert all(t.device.type == "meta" for t in other.net.state_dict().values())
    assert approx._for_device(torch.device("meta")) is other  # made once, then reused
    assert approx._for_device(here) is approx
    assert all(t.device == here for t in approx.net.state_dict().values())


def test_moving_one_model_leaves_another_model_working(make_adata):
    adata = make_adata(n_cells=32)
    pybivi.ContrastiveBiVI.setup_anndata(adata)
    moved = pybivi.ContrastiveBiVI(adata, n_hidden=8, scheme="bursty")
    kept = pybivi.ContrastiveBiVI(adata, n_hidden=8, scheme="bursty")
    torch.manual_seed(0)  # the ELBO is a one-draw estimate
    before = kept.elbo()
    moved.module.to("meta")  # as model.train(device="cuda") moves its module
    assert moved.module.log_theta.device.type == "meta"
    approx = load_default_approximator()
    assert approx.box_lo.device.type == "cpu"
    # The other model still evaluates on the CPU, to the same value as before.
    torch.manual_seed(0)
    assert kept.elbo() == before
