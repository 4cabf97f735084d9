"""The ELBO objective and its Lightning training plan (one loop for every device and strategy).

The objective is Pyro's ``TraceMeanField_ELBO`` (analytic Gaussian KLs, one particle),
divided by the plate size so that the loss is per cell (as in scvi-tools, which keeps
Adam's weight decay on the same scale as theirs). KL warm-up is linear per step from a
small positive weight, because ``poutine.scale(0)`` is refused by Pyro. The plan follows
Pyro's ``examples/svi_lightning.py``: the loss is ``differentiable_loss`` of the module's
``model`` and ``guide``, optimised by Lightning with plain Adam.

Data parallelism: see :mod:`pybivi.training_data`.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable
from typing import Any

import lightning as L
import numpy as np
import pyro
import torch
from pyro.infer import TraceMeanField_ELBO
from tqdm.auto import tqdm

from pybivi.training_data import ShardedCells, rank_and_world

__all__ = [
    "ElboTrainingPlan",
    "PlanSettings",
    "evaluate_loss",
    "forget_params",
    "kl_schedule",
]


def kl_schedule(step: int, warmup_steps: int, min_weight: float = 1e-3) -> float:
    """Linear KL weight: ``min_weight`` at step 0, 1 after ``warmup_steps`` steps."""
    if warmup_steps <= 0:
        return 1.0
    return float(min(1.0, min_weight + (1.0 - min_weight) * step / warmup_steps))


def forget_params(module: torch.nn.Module) -> None:
    """Drop ``module``'s entries from Pyro's global param store.

    ``model``/``guide`` register the module with :func:`pyro.module` (so plain Pyro SVI
    works), which keeps references in a process-wide store; pybivi optimises the module
    directly, so it removes them afterwards and old models can be freed.
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
    total, n = _loss_sums(module, batches, kl_weight, n_particles)
    return total / max(n, 1)


def _loss_sums(
    module: torch.nn.Module, batches: Iterable[dict[str, Any]], kl_weight: float, n_particles: int
) -> tuple[float, int]:
    """Summed per-cell negative ELBO and number of cells over ``batches``."""
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
    return total, n


@dataclasses.dataclass
class PlanSettings:
    """Optimisation settings of :class:`ElboTrainingPlan` (see ``BaseModel.train``)."""

    lr: float = 1e-3
    weight_decay: float = 1e-6
    kl_warmup_epochs: float = 1.0
    min_kl_weight: float = 1e-3
    early_stopping: bool = False
    patience: int = 10
    seed: int = 0
    validation_particles: int = 1
    validation_batch_size: int = 512
    progress_bar: bool = True
    #: identifies the model a checkpoint belongs to (checked on resume)
    fingerprint: dict[str, Any] = dataclasses.field(default_factory=dict)


class ElboTrainingPlan(L.LightningModule):
    """Lightning module that fits a pybivi Pyro module by minibatch SVI.

    Parameters
    ----------
    module
        The Pyro module (``model``/``guide`` take a batch and ``kl_weight``).
    cells
        :class:`pybivi.data.CellData` of the training AnnData.
    train_indices, validation_indices
        Rows trained on and held out (``validation_indices`` may be empty).
    batch_size
        Cells per optimisation step over all processes.
    settings
        Adam, warm-up, early-stopping and seed settings.
    previous_history
        History rows of earlier training runs (kept in checkpoints, so that a resumed
        model has its whole history).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        cells: Any,
        train_indices: np.ndarray,
        validation_indices: np.ndarray,
        batch_size: int,
        settings: PlanSettings,
        previous_history: list[dict[str, float]] | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.settings = settings
        self.train_data = ShardedCells(cells, train_indices, batch_size, settings.seed, self)
        self.cells, self.validation_indices = cells, np.asarray(validation_indices, np.int64)
        self.elbo = TraceMeanField_ELBO(num_particles=1)
        self.previous_history = list(previous_history or [])
        self.rows: list[dict[str, float]] = []
        self.best, self.since_best = math.inf, 0
        self.warmup_steps = 0
        self._rng_to_restore: dict[str, Any] | None = None
        self._epoch_loss, self._epoch_cells = 0.0, 0
        self._bar: Any = None

    # ------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the module's parameters (paper: lr 1e-3, weight decay 1e-6)."""
        s = self.settings
        return torch.optim.Adam(self.module.parameters(), lr=s.lr, weight_decay=s.weight_decay)

    def train_dataloader(self) -> ShardedCells:
        """This process's minibatches (Lightning iterates it once per epoch)."""
        return self.train_data

    def kl_weight(self) -> float:
        """KL weight of the next optimisation step."""
        return kl_schedule(self.global_step, self.warmup_steps, self.settings.min_kl_weight)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Negative ELBO per cell of one minibatch, at the warm-up's KL weight."""
        module = self.module
        loss = self.elbo.differentiable_loss(module.model, module.guide, batch, self.kl_weight())
        loss = loss / module.n_cells
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the loss became {value} at epoch {self.current_epoch}; try a smaller lr or "
                "check that the counts are raw and every cell has a positive library size"
            )
        size = len(batch["index"])
        self._epoch_loss += value * size
        self._epoch_cells += size
        return loss

    # ------------------------------------------------------------------ epochs
    def on_train_start(self) -> None:
        """Warm-up length, progress bar, and the random state (restored or seeded)."""
        self.warmup_steps = int(round(self.settings.kl_warmup_epochs * len(self.train_data)))
        rank, world = rank_and_world(self)
        restored = self._rng_to_restore is not None and _set_rng_state(
            self._rng_to_restore, rank, world, self.device
        )
        self._rng_to_restore = None
        if not restored:
            # Rank 0 uses the seed itself; the others derive theirs from it and their rank.
            seed = self.settings.seed
            pyro.set_rng_seed(seed if rank == 0 else _derived_seed(seed, rank))
        if self.settings.progress_bar and self.trainer.is_global_zero:
            self._bar = tqdm(
                total=self.trainer.max_epochs, initial=self.current_epoch,
                desc="training", unit="epoch",
            )

    def on_train_epoch_start(self) -> None:
        """Reset the epoch's loss sums; tell the data which epoch it is."""
        self._epoch_loss, self._epoch_cells = 0.0, 0
        self.train_data.epoch = int(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        """History row, validation loss and the early-stopping decision (same on every rank)."""
        self._average_buffers()
        sums = [self._epoch_loss, self._epoch_cells, *self._validation_sums()]
        train_sum, train_n, val_sum, val_n = self._sum_over_processes(sums)
        row = {
            "epoch": int(self.current_epoch),
            "train_loss": train_sum / train_n if train_n else math.nan,
            "kl_weight": self.kl_weight(),
            "validation_loss": val_sum / val_n if val_n else math.nan,
        }
        self.rows.append(row)
        monitored = row["validation_loss"] if val_n else row["train_loss"]
        if monitored < self.best:
            self.best, self.since_best = monitored, 0
        elif self.global_step >= self.warmup_steps:
            # During warm-up the optimised loss rises with the KL weight: not a plateau.
            self.since_best += 1
        if self.settings.early_stopping and self.since_best >= self.settings.patience:
            self.trainer.should_stop = True
        # Once per epoch, for checkpoint callbacks (``monitor="monitored_loss"``).
        # (Equal on every process already; sync_dist only keeps Lightning from warning.)
        distributed = rank_and_world(self)[1] > 1
        self.log("monitored_loss", float(monitored), batch_size=1, sync_dist=distributed)
        if self._bar is not None:
            self._bar.set_postfix(elbo=f"{-row['train_loss']:.4g}", refresh=False)
            self._bar.update(1)

    def on_train_end(self) -> None:
        """Close the progress bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _validation_sums(self) -> tuple[float, int]:
        idx = self.validation_indices
        if not len(idx):
            return 0.0, 0
        rank, world = rank_and_world(self)
        batches = self.cells.iterate(
            idx[rank::world], self.settings.validation_batch_size, device=self.device
        )
        return _loss_sums(self.module, batches, 1.0, self.settings.validation_particles)

    def _average_buffers(self) -> None:
        """Average the batch-norm running statistics over the processes.

        DDP averages gradients, so parameters agree; each process's running statistics
        follow its own minibatches instead. Their average (a statistic of all cells of the
        epoch's last steps) gives every process the same model for evaluation.
        """
        if rank_and_world(self)[1] == 1:
            return
        import torch.distributed as dist

        world = dist.get_world_size()
        for buffer in self.module.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer.data, op=dist.ReduceOp.SUM)
                buffer.data /= world
            else:
                dist.broadcast(buffer.data, src=0)

    def _sum_over_processes(self, values: list[float]) -> list[float]:
        if rank_and_world(self)[1] == 1:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        return [float(v) for v in self.trainer.strategy.reduce(tensor, reduce_op="sum")]

    # ------------------------------------------------------------- checkpoints
    def get_extra_state(self) -> dict[str, Any]:
        """History and early-stopping state: saved with the weights (and sent back to the
        main process after ``ddp_spawn``)."""
        return {
            "rows": [dict(r) for r in self.rows],
            "previous_history": [dict(r) for r in self.previous_history],
            "best": float(self.best),
            "since_best": int(self.since_best),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`get_extra_state`."""
        self.rows = [dict(r) for r in state["rows"]]
        self.previous_history = [dict(r) for r in state["previous_history"]]
        self.best, self.since_best = float(state["best"]), int(state["since_best"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add every process's random state and the model's fingerprint."""
        checkpoint["pybivi"] = {
            "fingerprint": dict(self.settings.fingerprint),
            "rng": _gather_rng_state(self),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check that the checkpoint belongs to this model; keep its random state."""
        saved = checkpoint.get("pybivi")
        if saved is None:
            raise ValueError("the checkpoint was not written by pybivi's training")
        expected = self.settings.fingerprint
        if saved["fingerprint"] != expected:
            diff = sorted(k for k in expected if saved["fingerprint"].get(k) != expected[k])
            raise ValueError(
                f"the checkpoint belongs to another model or training set-up (differs in {diff}); "
                "resume with the same data, model, seed, batch size and validation split"
            )
        self._rng_to_restore = saved["rng"]


def _derived_seed(seed: int, rank: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])


def _gather_rng_state(plan: L.LightningModule) -> dict[str, Any]:
    """Torch (and CUDA) generator states of every process, stacked by rank."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if plan.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(plan.device)
    if rank_and_world(plan)[1] > 1:
        for key in ("torch", "cuda"):
            if key in state:
                gathered = plan.all_gather(state[key].to(plan.device))
                state[key] = gathered.cpu()
    else:
        state = {k: (v.unsqueeze(0) if torch.is_tensor(v) else v) for k, v in state.items()}
    return state


def _set_rng_state(state: dict[str, Any], rank: int, world: int, device: torch.device) -> bool:
    """Restore this process's generators; false (nothing done) if the process count changed."""
    if state["torch"].shape[0] != world:
        return False
    torch.set_rng_state(state["torch"][rank].to(torch.uint8).cpu())
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][rank].to(torch.uint8).cpu(), device)
    return True


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value
