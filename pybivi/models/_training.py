"""Training and scoring of the model classes: :meth:`train`, :meth:`elbo`, :meth:`diagnostics`.

A mixin of :class:`pybivi.models.base.BaseModel`, which builds the module and the cell
data these methods read (``self.module``, ``self._cells``, ``self.make_batches``); see
:mod:`pybivi.models` for the classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pybivi import diagnostics as _diagnostics
from pybivi.training import evaluate_loss, train_model

__all__ = ["TrainingMixin"]


class TrainingMixin:
    """Fitting by SVI, the ELBO of any cells and the approximator's domain diagnostics."""

    def train(
        self,
        max_epochs: int = 100,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        kl_warmup_epochs: float | None = None,
        seed: int = 0,
        progress_bar: bool = True,
        device: str | torch.device | None = None,
        early_stopping: bool = False,
        validation_fraction: float | None = None,
        early_stopping_patience: int = 10,
        min_kl_weight: float = 1e-3,
        split_seed: int | None = None,
        validation_particles: int = 1,
        accelerator: str = "auto",
        devices: int | str | Sequence[int] = 1,
        strategy: Any = "auto",
        num_nodes: int = 1,
        precision: str | int = "32-true",
        callbacks: Sequence[Any] | None = None,
        checkpoint_dir: str | Path | None = None,
        resume: bool | str | Path = False,
    ) -> pd.DataFrame:
        """Fit by minibatch SVI through PyTorch Lightning (paper appendix C defaults).

        Parameters
        ----------
        max_epochs, batch_size, lr, weight_decay
            Adam on minibatches of cells (paper: 100, 128, 1e-3, 1e-6). ``batch_size``
            counts the cells of one optimisation step over all processes: with ``N``
            processes each takes ``batch_size // N``, so the number of steps per epoch
            and the gradient noise do not depend on ``N``. With ``resume``,
            ``max_epochs`` counts the epochs before the checkpoint too.
        kl_warmup_epochs
            Length of the linear KL warm-up in epochs; default ``max_epochs // 4``
            (at least 1), so it grows with ``max_epochs``: pass a number to keep the same
            warm-up when comparing runs of different lengths. ``0`` disables it.
        seed
            Seeds minibatch order (a shuffle per epoch from ``(seed, epoch)``), the
            reparameterised draws and, unless ``split_seed`` is given, the validation split.
        progress_bar
            Show a tqdm bar with the ELBO per cell, one tick per epoch.
        device
            Shorthand kept from earlier versions: ``"auto"`` (CUDA when available),
            ``"cpu"``, ``"cuda"`` or ``"cuda:<index>"`` (one device). Do not combine it
            with ``accelerator``.
        early_stopping, early_stopping_patience
            Stop when the validation (else training) loss has not improved for that many epochs.
        validation_fraction
            Fraction of cells held out for ``history["validation_loss"]``; default 0.1 with
            early stopping, else 0. The cells used are kept in :attr:`train_indices` and
            :attr:`validation_indices`.
        split_seed
            Seed of the validation split alone. Runs with the same ``split_seed`` and
            ``validation_fraction`` hold out the same cells whatever their ``seed``, so
            their validation losses are paired. ``None``: the split is drawn from ``seed``.
        validation_particles
            Particles (latent draws per cell) of the validation loss; more particles
            lower its noise (variance about ``1 / validation_particles``).
        accelerator
            ``"auto"`` (a GPU when CUDA is available, else the CPU), ``"cpu"`` or ``"gpu"``.
        devices
            Devices per node: a number (on the CPU, the number of processes), a list of
            GPU indices, or ``"auto"`` (every GPU). More than one needs a data-parallel
            ``strategy``.
        strategy
            Lightning strategy: ``"auto"`` (one device), ``"ddp"`` (one process per device;
            the script is started again for each extra process), ``"ddp_spawn"`` or
            ``"ddp_notebook"`` (processes forked from this one, e.g. in Jupyter), or a
            ``lightning.pytorch.strategies.Strategy`` object. The CPU uses the gloo backend,
            GPUs nccl.
        num_nodes
            Machines taking part (with a cluster launcher such as SLURM or ``torchrun``).
        precision
            Lightning precision, e.g. ``"32-true"`` (default) or ``"bf16-mixed"``.
        callbacks
            Extra ``lightning.pytorch.callbacks.Callback`` objects.
        checkpoint_dir
            Directory for checkpoints, written after every epoch: ``last.ckpt`` and
            ``best.ckpt`` (lowest validation, else training, loss). It must be new, empty
            or hold pybivi checkpoints only (these are replaced only with ``resume``).
        resume
            ``True``: continue from ``checkpoint_dir/last.ckpt`` when it exists (weights,
            optimiser, epoch, history, random state); a path: continue from that file.
            The seed, batch size, data and validation split must be those of the run
            that wrote it.

        Returns
        -------
        pandas.DataFrame
            ``self.history`` (appended to on repeated calls): ``epoch``, ``train_loss``
            (the optimised, warm-up weighted negative ELBO per cell), ``kl_weight`` and
            ``validation_loss`` (NaN without validation cells).

        Raises
        ------
        ValueError
            Invalid settings; a GPU without CUDA; a checkpoint of another model or set-up.
        FileExistsError
            ``checkpoint_dir`` holds other files, or checkpoints while ``resume`` is false.
        """
        options = dict(locals())
        del options["self"]
        return train_model(self, cells=self._cells, **options)

    def elbo(
        self,
        adata: Any = None,
        batch_size: int = 512,
        indices: np.ndarray | Sequence[int] | None = None,
        n_particles: int = 1,
        seed: int | None = None,
    ) -> float:
        """Negative ELBO per cell of ``adata`` (default: training data), eval mode.

        Parameters
        ----------
        adata
            Cells to score (default: the training data).
        batch_size
            Cells per forward pass.
        indices
            Rows of ``adata`` (e.g. ``model.validation_indices``); default all.
        n_particles
            Latent draws per cell; the estimate's variance falls as ``1 / n_particles``.
        seed
            Seed of the latent draws (the global random state is restored); ``None``
            uses the current one.

        Returns
        -------
        float
            The estimated negative ELBO per cell (lower is better).
        """
        if int(n_particles) < 1:
            raise ValueError(f"n_particles must be >= 1, got {n_particles}")
        batches = self.make_batches(adata, indices=indices, batch_size=batch_size)
        with torch.random.fork_rng(devices=[]), _diagnostics.quiet_backend(self.module):
            if seed is not None:
                torch.manual_seed(seed)
            return evaluate_loss(self.module, batches, n_particles=int(n_particles))

    def diagnostics(self, adata: Any = None, by: str = "region") -> pd.DataFrame:
        """Share of ``(n, m)`` pairs outside the bursty approximator's domain, now.

        Evaluated at the current parameters (posterior-mean latents, observed libraries)
        on every cell of ``adata`` (default: the training data); see
        :func:`pybivi.diagnostics.domain_table` for the regions and what each means.
        Models without the shipped approximator get an empty table.

        Parameters
        ----------
        adata
            Cells to evaluate (default: the training data).
        by
            ``"region"`` (one row per region and ``outside``) or ``"gene"``.

        Returns
        -------
        pandas.DataFrame
        """
        return _diagnostics.domain_table(self, adata, by=by)
