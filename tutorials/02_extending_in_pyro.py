# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Extending the model in Pyro
#
# Every pybivi model is one small Pyro program: a `model` that reads like the paper's
# generative story and a `guide` that mirrors it. This tutorial opens it up. You will:
#
# 1. run the model and the guide of a ContrastiveBiVI directly and look at their sample sites;
# 2. change one piece of the generative story, the salient prior, by overriding one method of
#    the module: instead of `t ~ Normal(mu_c, I)` each perturbation label gets its own learned
#    spread, `t ~ Normal(mu_c, diag(s_c^2))`, so that a weak perturbation can keep its cells
#    close to its mean and a heterogeneous one can spread them out;
# 3. build it through the high-level class with `module_cls=`, train it with a plain Pyro
#    `SVI` loop on pybivi's minibatches, and use the class for everything else (saving and
#    loading included).

# %%
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, TraceMeanField_ELBO
from torch import nn

import pybivi
from pybivi import datasets, pp
from pybivi.module import ContrastiveModule
from pybivi.training import evaluate_loss

FAST = os.environ.get("PYBIVI_TUTORIAL_FAST") == "1"
OUT = Path(os.environ.get("PYBIVI_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="pybivi_pyro_"))
OUT.mkdir(parents=True, exist_ok=True)
N_CELLS, N_GENES = (300, 80) if FAST else (2000, 400)
EPOCHS = 6 if FAST else 40
SCHEME = "bursty"

# %%
raw = datasets.simulate_perturbseq(n_cells=N_CELLS, n_genes=N_GENES, n_programs=3, seed=2)
adata = pp.prepare(raw, perturbation_key="perturbation", control_labels="NT",
                   program_key="program", score_cell_cycle=False, n_top_genes=None)
pybivi.ContrastiveBiVI.setup_anndata(adata, perturbation_key="perturbation", control_labels="NT")
model = pybivi.ContrastiveBiVI(adata, scheme=SCHEME, seed=0)
module = model.module

# %% [markdown]
# ## 1. The model and the guide, directly
#
# `model.make_batches()` yields the minibatch dictionaries the module reads: the counts
# `x_nascent` and `x_mature` (cells x genes), the per-species library sizes, the label index
# of each cell, the control flag and the row index of each cell (for the `cells` plate, whose
# size is the whole data set so that a minibatch ELBO estimates the full one).
#
# Tracing the guide and then replaying the model on the guide's draws shows every site.

# %%
batch = next(model.make_batches(batch_size=64))
print({k: tuple(v.shape) for k, v in batch.items()})

guide_trace = poutine.trace(module.guide).get_trace(batch)
model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(batch)
for name, site in model_trace.nodes.items():
    if name == "cells":  # the plate's own subsample site
        continue
    if site["type"] == "sample" and not site["infer"].get("_deterministic"):
        fn = site["fn"]
        print(f"{name:2s} {type(fn).__name__:12s} batch {tuple(fn.batch_shape)} "
              f"event {tuple(fn.event_shape)} observed={site['is_observed']}")

# %% [markdown]
# `z` and `t` are the background and salient latents (one vector per cell) and `x` the
# observed (nascent, mature) pairs, with an event over genes and the pair. Control cells have
# `t = 0` exactly: the `t` site is masked for them in the model *and* in the guide, so they
# contribute no salient KL term.

# %%
# Derived quantities are deterministic sites of the model: the salient latents with the
# controls at 0, the decoded means and the scheme's kinetic parameters.
deterministic = [
    name for name, site in model_trace.nodes.items()
    if site["type"] == "sample" and site["infer"].get("_deterministic")
]
print("deterministic sites:", deterministic)
assert {"salient", "mean_nascent", "burst_size", "degradation_rate"} <= set(deterministic)
assert torch.all(model_trace.nodes["salient"]["value"][batch["is_control"]] == 0)
assert model_trace.nodes["x"]["fn"].event_shape == (adata.n_vars, 2)
t_mask = model_trace.nodes["t"]["mask"]
assert torch.equal(t_mask, ~batch["is_control"])
elbo = TraceMeanField_ELBO()
print(f"negative ELBO per cell of this minibatch: "
      f"{elbo.loss(module.model, module.guide, batch) / module.n_cells:.1f}")

# %% [markdown]
# ## 2. Override one piece: a learned spread per perturbation
#
# `ContrastiveModule` is built from small methods (`background_prior`, `salient_prior`,
# `likelihood_dist`, `decode`), and the model calls them in the order of the generative story.
# To change the salient prior we subclass and override `salient_prior` only. The new scales
# are an `nn.Parameter`: `pyro.module` inside the model registers every parameter of the
# module, so the optimiser sees them with no further work. The KL term stays analytic
# (Normal against Normal), so `TraceMeanField_ELBO` still computes it in closed form.


# %%
class LabelScaleModule(ContrastiveModule):
    """ContrastiveBiVI with ``t | c ~ Normal(mu_c, diag(s_c^2))``, ``s_c`` learned per label."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_salient_scale = nn.Parameter(torch.zeros(self.n_labels, self.n_salient))

    def salient_prior(self, batch):
        loc = super().salient_prior(batch).base_dist.loc  # mu_c of each cell's label
        scale = self.log_salient_scale[batch["label"].clamp(min=0)].exp()
        return dist.Normal(loc, scale).to_event(1)


# %% [markdown]
# The model class builds its module from `module_cls`: the same sizes and settings as the
# default, only the class changes. (A subclass with arguments of its own takes them through
# `module_kwargs={...}`.)

# %%
custom_model = pybivi.ContrastiveBiVI(adata, scheme=SCHEME, seed=0, module_cls=LabelScaleModule)
custom = custom_model.module
registry = custom_model.registry
assert isinstance(custom, LabelScaleModule)

# %% [markdown]
# ## 3. Train it with Pyro's SVI
#
# A plain Pyro loop: Adam, `TraceMeanField_ELBO`, minibatches from the model class in a new
# random order each epoch. (`model.train` does the same with a KL warm-up and a history; we
# skip the warm-up here to keep the loop short.) The loss Pyro returns is the negative ELBO of
# the whole data set estimated from the minibatch; dividing by the number of cells gives the
# per-cell figure that `model.elbo()` reports.

# %%
pyro.set_rng_seed(0)
rng = np.random.default_rng(0)
before = evaluate_loss(custom, custom_model.make_batches(batch_size=256))
svi = SVI(custom.model, custom.guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
losses = []
for _ in range(EPOCHS):
    custom.train()
    epoch_loss = 0.0
    for b in custom_model.make_batches(batch_size=128, shuffle=True, rng=rng):
        if len(b["index"]) < 2:  # batch normalisation needs two cells
            continue
        epoch_loss += svi.step(b) / custom.n_cells
    losses.append(epoch_loss)
after = evaluate_loss(custom, custom_model.make_batches(batch_size=256))
print("training loss per epoch:", np.round(losses, 1))
print(f"negative ELBO per cell: {before:.1f} before training, {after:.1f} after")
assert after < before

# %% [markdown]
# The learned spreads, one row per perturbation (the controls' row is never used: their `t` is
# 0). A perturbation whose cells respond alike gets a small spread.

# %%
scales = pd.DataFrame(
    custom.log_salient_scale.detach().exp().numpy(),
    index=pd.Index(registry.labels, name="label"),
).drop(index=registry.control_labels)
assert (scales.to_numpy() > 0).all()
print(scales.mean(axis=1).rename("mean salient scale").round(3).to_string())
scales.to_csv(OUT / "learned_salient_scales.csv")

# %% [markdown]
# ## 4. Back to the high-level API
#
# The custom module already lives inside `custom_model`, so representations, posterior export,
# Bayes factors and posterior-predictive checks work unchanged: they trace the module's guide and
# replay its model, so the learned spreads shape every draw. `model.train(...)` would have
# trained it too; we trained it by hand, so we say so.

# %%
custom_model.is_trained = True
salient = custom_model.get_latent_representation(kind="salient")
assert np.all(salient[adata.obs["is_control"].to_numpy()] == 0.0)
print("salient representation:", salient.shape)
print(f"negative ELBO per cell (model.elbo): {custom_model.elbo():.1f}")

# %% [markdown]
# Saving stores the module's class by its import path (here `__main__:LabelScaleModule`) and
# loading imports it again, so the learned spreads come back with the weights. To load in
# another Python process, define the class in a module that process can import (or pass
# `module_cls=` to `load`).

# %%
custom_model.save(OUT / "label_scale_model", overwrite=True)
loaded = pybivi.ContrastiveBiVI.load(OUT / "label_scale_model", adata)
assert type(loaded.module).__name__ == "LabelScaleModule"
assert torch.equal(loaded.module.log_salient_scale, custom.log_salient_scale.detach())
print("reloaded:", loaded)
