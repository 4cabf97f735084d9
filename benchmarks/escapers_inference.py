"""Two ways to fit the escaper mixture prior: Monte-Carlo KL against enumeration.

``salient_prior="mixture"`` puts ``w_c Normal(mu_c, I) + (1 - w_c) Normal(0, I)`` on the
salient latents of each perturbation label. Two inference schemes fit it:

* ``mc_kl`` (what pybivi ships): the mixture density is the prior of ``t``; the ELBO stays
  ``TraceMeanField_ELBO``, whose KL of ``t`` falls back to a one-sample Monte-Carlo estimate
  (``log q(t) - log p(t)`` at the sampled ``t``) while the KL of ``z`` stays analytic;
* ``enumerate``: a per-cell Bernoulli site ``responder ~ Bernoulli(w_c)`` with
  ``t | responder ~ Normal(responder * mu_c, I)``, summed out exactly by
  ``TraceEnum_ELBO`` (which estimates every KL, ``z``'s too, by Monte Carlo).

Summing the Bernoulli out gives the mixture density, so both maximise the same ELBO; they
differ in the variance of its estimate and in cost. Both run through the same minimal
loop here (Adam, linear KL warm-up over the first quarter, one particle) on the same planted
screen (two strong programs, one perturbation each, ``--escape`` escapers), and the script
prints seconds per epoch and the escaper-detection AUROC of
:meth:`get_perturbation_probability` (the enumerated posterior of the Bernoulli is the same
Bayes rule), for each of ``--seeds``.

Usage (one torch thread, about a minute)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/escapers_inference.py
        [--cells 600 --genes 100 --epochs 40 --seeds 0 1 2 --escape 0.3]
"""

from __future__ import annotations

import argparse
import time

import docs_output
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import TraceEnum_ELBO, TraceMeanField_ELBO
from sklearn.metrics import roc_auc_score

from pybivi import datasets
from pybivi.models import ContrastiveBiVI
from pybivi.module import ContrastiveModule


class EnumeratedEscapers(ContrastiveModule):
    """The mixture prior as a Bernoulli site that ``TraceEnum_ELBO`` sums out."""

    def salient_prior(self, batch):
        label = self._salient_label(batch)
        # As in the shipped mixture: controls are escapers for certain.
        responder = pyro.sample(
            "responder",
            dist.Bernoulli(logits=self.responder_logit(batch, label)),
            infer={"enumerate": "parallel"},
        )
        loc = responder.unsqueeze(-1) * self.salient_means[label]
        return dist.Normal(loc, torch.ones_like(loc)).to_event(1)


def planted_screen(cells: int, genes: int, escape: float, seed: int):
    return datasets.simulate_perturbseq(
        n_cells=cells, n_genes=genes, n_programs=2, seed=seed, perturbations_per_program=1,
        n_weak_perturbations=0, genes_per_program=genes // 5, effect_range=(2.0, 3.0),
        cell_cycle_fraction=0.1, doublet_fraction=0.0, control_fraction=0.34,
        program_kinds=["burst_size", "degradation"], escape_fraction=escape,
    )  # fmt: skip


def fit(model, elbo, epochs: int, seed: int, lr: float = 3e-3, batch_size: int = 64) -> float:
    """Minimal SVI loop shared by both schemes; returns seconds per epoch."""
    module = model.module
    pyro.set_rng_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    n_batches = -(-model.registry.n_cells // batch_size)
    warmup, step = max(1, epochs // 4) * n_batches, 0
    module.train()
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in model.make_batches(batch_size=batch_size, shuffle=True, rng=rng):
            kl_weight = min(1.0, max(1e-3, step / warmup))
            optimizer.zero_grad()
            loss = elbo.differentiable_loss(module.model, module.guide, batch, kl_weight)
            (loss / module.n_cells).backward()
            optimizer.step()
            step += 1
    module.eval()
    model.is_trained = True
    return (time.perf_counter() - start) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=600)
    parser.add_argument("--genes", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--escape", type=float, default=0.3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    schemes = {
        "mc_kl": (ContrastiveModule, lambda: TraceMeanField_ELBO()),
        "enumerate": (EnumeratedEscapers, lambda: TraceEnum_ELBO(max_plate_nesting=1)),
    }
    rows = []
    for seed in args.seeds:
        adata = planted_screen(args.cells, args.genes, args.escape, seed)
        ContrastiveBiVI.setup_anndata(adata)
        perturbed = (adata.obs["perturbation"] != "NT").to_numpy()
        for name, (module_cls, make_elbo) in schemes.items():
            pyro.clear_param_store()
            model = ContrastiveBiVI(adata, n_hidden=32, n_background=4, n_salient=2,
                                    salient_prior="mixture", module_cls=module_cls, seed=seed)
            per_epoch = fit(model, make_elbo(), args.epochs, seed)
            prob = model.get_perturbation_probability(n_samples=25)
            auroc = roc_auc_score(adata.obs["responder"][perturbed], prob[perturbed])
            rows.append({"seed": seed, "scheme": name, "s_per_epoch": per_epoch, "auroc": auroc})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(table.groupby("scheme")[["s_per_epoch", "auroc"]].agg(["mean", "std"]).round(3))


if __name__ == "__main__":
    docs_output.run(main)
