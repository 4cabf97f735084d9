"""Minibatch stochastic variational inference for :class:`pybivi.module.ContrastiveModule`.

The objective is Pyro's ``TraceMeanField_ELBO`` (analytic Gaussian KLs, one particle),
divided by the plate size so that the loss is per cell (as in scvi-tools, which keeps
Adam's weight decay on the same scale as theirs). KL warm-up is linear per step from a
small positive weight, because ``poutine.scale(0)`` is refused by Pyro.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch
from pyro.infer import TraceMeanField_ELBO
from tqdm.auto import tqdm

from pybivi._allocator import tune_allocator


def kl_schedule(step: int, warmup_steps: int, min_weight: float = 1e-3) -> float:
    """Linear KL weight: ``min_weight`` at step 0, 1 after ``warmup_steps`` steps."""
    if warmup_steps <= 0:
        return 1.0
    return float(min(1.0, min_weight + (1.0 - min_weight) * step / warmup_steps))


def forget_params(module: torch.nn.Module) -> None:
    """Drop ``module``'s entries from Pyro's global param store.

    ``model``/``guide`` register the module with :func:`pyro.module` (so plain Pyro SVI
    works), which keeps references in a process-wide store; the pybivi loop optimises
    the module directly, so it removes them afterwards and old models can be freed.
    """
    name = getattr(module, "pyro_name", None)
    if name is None:
        return
    store = pyro.get_param_store()
    for key in [k for k in store.keys() if k.startswith(f"{name}$$$")]:
        del store[key]


def evaluate_loss(
    module: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    kl_weight: float = 1.0,
    n_particles: int = 1,
) -> float:
    """Negative ELBO per cell over ``batches`` (module in eval mode, no gradients).

    ``n_particles`` latent draws per cell are averaged: the estimate's variance falls as
    ``1 / n_particles`` (the KL terms are analytic; only the likelihood term is sampled).
    """
    elbo = TraceMeanField_ELBO(num_particles=int(n_particles))
    was_training = module.training
    module.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            size = len(batch["index"])
            # loss / n_cells is the per-cell mean over this batch; weight it by its size.
            loss = elbo.differentiable_loss(module.model, module.guide, batch, kl_weight)
            total += float(loss) / module.n_cells * size
            n += size
    module.train(was_training)
    forget_params(module)
    return total / max(n, 1)


def fit(
    module: torch.nn.Module,
    train_batches: Callable[[int], Iterable[dict[str, Any]]],
    n_batches: int,
    max_epochs: int,
    lr: float,
    weight_decay: float,
    kl_warmup_epochs: float,
    validation_batches: Callable[[], Iterable[dict[str, Any]]] | None = None,
    early_stopping: bool = False,
    patience: int = 10,
    min_kl_weight: float = 1e-3,
    progress_bar: bool = True,
    validation_particles: int = 1,
) -> pd.DataFrame:
    """Train ``module`` with Adam and return the per-epoch history.

    Parameters
    ----------
    module
        The Pyro module (its ``model``/``guide`` take a batch and ``kl_weight``).
    train_batches
        ``train_batches(epoch)`` yields that epoch's shuffled training batches.
    n_batches
        Batches per epoch (for the warm-up schedule).
    max_epochs, lr, weight_decay
        Adam settings (paper: 100, 1e-3, 1e-6).
    kl_warmup_epochs
        Epochs of linear KL warm-up (0 disables it).
    validation_batches
        Yields validation batches; their loss is the full (``kl_weight = 1``) negative ELBO.
    early_stopping, patience
        Stop when the monitored loss (validation if any, else training) has not improved
        for ``patience`` epochs after the warm-up.
    min_kl_weight
        First KL weight of the warm-up (must be positive).
    progress_bar
        Show a tqdm bar with the current ELBO per cell.
    validation_particles
        Latent draws per cell of the validation loss.

    Returns
    -------
    pandas.DataFrame
        One row per epoch: ``epoch``, ``train_loss`` (the optimised, warm-up weighted
        negative ELBO per cell), ``kl_weight`` and ``validation_loss`` (NaN without
        validation cells).
    """
    tune_allocator()  # else glibc returns minibatch buffers to the kernel every step
    elbo = TraceMeanField_ELBO(num_particles=1)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    warmup_steps = int(round(kl_warmup_epochs * n_batches))
    rows: list[dict[str, float]] = []
    best, since_best, step = math.inf, 0, 0
    bar = tqdm(range(max_epochs), disable=not progress_bar, desc="training", unit="epoch")
    for epoch in bar:
        module.train()
        losses, sizes = [], []
        for batch in train_batches(epoch):
            kl_weight = kl_schedule(step, warmup_steps, min_kl_weight)
            optimizer.zero_grad(set_to_none=True)
            loss = elbo.differentiable_loss(module.model, module.guide, batch, kl_weight)
            loss = loss / module.n_cells
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the loss became {float(loss)} at epoch {epoch}; try a smaller lr or check "
                    "that the counts are raw and every cell has a positive library size"
                )
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            sizes.append(len(batch["index"]))
            step += 1
        row = {
            "epoch": epoch,
            "train_loss": float(np.average(losses, weights=sizes)) if losses else math.nan,
            "kl_weight": kl_schedule(step, warmup_steps, min_kl_weight),
            "validation_loss": math.nan,
        }
        if validation_batches is not None:
            row["validation_loss"] = evaluate_loss(
                module, validation_batches(), n_particles=validation_particles
            )
        rows.append(row)
        monitored = row["validation_loss"] if validation_batches is not None else row["train_loss"]
        bar.set_postfix(elbo=f"{-row['train_loss']:.4g}", refresh=False)
        if monitored < best:
            best, since_best = monitored, 0
        elif step >= warmup_steps:
            # During warm-up the optimised loss rises with the KL weight: not a plateau.
            since_best += 1
        if early_stopping and since_best >= patience:
            break
    module.eval()
    forget_params(module)
    return pd.DataFrame(rows)
