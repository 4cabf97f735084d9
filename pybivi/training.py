"""Training of the pybivi models through PyTorch Lightning: devices, DDP, checkpoints.

:func:`train_model` is the body of ``BaseModel.train``: it splits the cells, builds an
:class:`pybivi.training_plan.ElboTrainingPlan` and runs it with a ``lightning.Trainer``
on the requested accelerator, devices, strategy (e.g. ``"ddp"``) and precision, saving
and resuming checkpoints on request. The objective and its pieces (:func:`kl_schedule`,
:func:`evaluate_loss`, :func:`forget_params`) live in :mod:`pybivi.training_plan` and are
reachable from here.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from pybivi._allocator import tune_allocator
from pybivi.training_plan import (
    ElboTrainingPlan,
    PlanSettings,
    evaluate_loss,
    forget_params,
    kl_schedule,
)

__all__ = [
    "evaluate_loss",
    "forget_params",
    "kl_schedule",
    "resolve_accelerator",
    "checkpoint_to_resume",
    "run_plan",
    "train_model",
]

#: the files pybivi writes in a ``checkpoint_dir``
CHECKPOINT_FILES = ("last.ckpt", "best.ckpt")
HISTORY_COLUMNS = ["epoch", "train_loss", "kl_weight", "validation_loss"]


def resolve_accelerator(
    device: str | torch.device | None, accelerator: str, devices: int | str | Sequence[int]
) -> tuple[str, int | str | list[int]]:
    """Lightning ``(accelerator, devices)`` from pybivi's ``device=`` or ``accelerator=``.

    ``device="cuda:1"`` becomes ``("gpu", [1])``, ``"cpu"`` ``("cpu", 1)``; ``"auto"``
    (as ``accelerator="auto"``) is the GPU when CUDA is available, else the CPU.

    Raises
    ------
    ValueError
        Both arguments are given, an unknown accelerator, or a GPU without CUDA.
    """
    cuda = torch.cuda.is_available()
    if device is not None and not (isinstance(device, str) and device == "auto"):
        if accelerator != "auto":
            raise ValueError("pass either device= or accelerator=/devices=, not both")
        device = torch.device(device)
        if device.type == "cpu":
            return "cpu", 1
        if device.type != "cuda":
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:index]', got {device}")
        if not cuda:
            raise ValueError("device='cuda' was requested but CUDA is not available")
        return "gpu", [device.index or 0]
    name = str(accelerator).lower()
    name = "gpu" if name == "cuda" else name
    if name == "auto":
        name = "gpu" if cuda else "cpu"
    if name not in ("cpu", "gpu"):
        raise ValueError(f"accelerator must be 'auto', 'cpu' or 'gpu', got {accelerator!r}")
    if name == "gpu" and not cuda:
        raise ValueError("accelerator='gpu' (or 'cuda') was requested but CUDA is not available")
    return name, devices


def checkpoint_to_resume(
    checkpoint_dir: str | Path | None, resume: bool | str | Path
) -> str | None:
    """The checkpoint file to resume from, after checking that ``checkpoint_dir`` is ours.

    ``checkpoint_dir`` may be new, empty or hold pybivi's ``last.ckpt``/``best.ckpt``
    (only with ``resume``: a new run never replaces them). ``resume=True`` continues from
    ``last.ckpt`` when there is one (a fresh start otherwise); a path resumes from that file.

    Raises
    ------
    FileExistsError
        ``checkpoint_dir`` holds other files, or checkpoints while ``resume`` is false.
    FileNotFoundError, ValueError
        ``resume`` names a missing file; ``resume=True`` without ``checkpoint_dir``.
    """
    if checkpoint_dir is not None:
        folder = Path(checkpoint_dir)
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"checkpoint_dir {folder} is a file, not a directory")
        names = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
        foreign = [n for n in names if n not in CHECKPOINT_FILES]
        if foreign:
            raise FileExistsError(
                f"checkpoint_dir {folder} holds files pybivi did not write ({foreign[:5]}); "
                "choose an empty or new directory so that nothing of yours is overwritten"
            )
        if names and resume is False:
            raise FileExistsError(
                f"checkpoint_dir {folder} holds checkpoints of an earlier run ({names}); pass "
                "resume=True to continue it, or choose another directory"
            )
    if resume is True:
        if checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir= (or pass resume=<checkpoint path>)")
        last = Path(checkpoint_dir) / "last.ckpt"
        return str(last) if last.exists() else None
    if resume is False or resume is None:
        return None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (resume=)")
    return str(path)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's start-up messages and advice that does not apply to in-memory batches."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in (
                ".*does not have many workers.*",
                ".*Checkpoint directory.*exists.*",
                ".*isinstance.treespec, LeafSpec.*",
            ):
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def run_plan(
    plan: ElboTrainingPlan,
    max_epochs: int,
    trainer_options: dict[str, Any],
    callbacks: Sequence[Callback] = (),
    checkpoint_dir: str | Path | None = None,
    resume: bool | str | Path = False,
) -> torch.device:
    """Fit ``plan`` with a ``lightning.Trainer``; return the device the weights should live on.

    ``trainer_options`` are ``accelerator``, ``devices``, ``strategy``, ``num_nodes`` and
    ``precision``. After ``ddp_spawn`` Lightning loads rank 0's weights (and, through
    :meth:`~pybivi.training_plan.ElboTrainingPlan.get_extra_state`, the history) into
    ``plan`` in this process.
    """
    ckpt_path = checkpoint_to_resume(checkpoint_dir, resume)
    callbacks = list(callbacks)
    if checkpoint_dir is not None:
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(checkpoint_dir), filename="best", monitor="monitored_loss",
                mode="min", save_top_k=1, save_last=True, save_on_train_epoch_end=True,
                enable_version_counter=False,
            )
        )
    with _quiet_lightning():
        trainer = _trainer(max_epochs, callbacks, trainer_options)
        world, batch_size = trainer.world_size, plan.train_data.batch_size
        if world > 1 and batch_size // world < 2:
            raise ValueError(
                f"batch_size={batch_size} leaves fewer than 2 cells per step to each of the "
                f"{world} processes; use batch_size >= {2 * world}"
            )
        tune_allocator()  # else glibc returns minibatch buffers to the kernel every step
        trainer.fit(plan, ckpt_path=ckpt_path, weights_only=True)
    return trainer.strategy.root_device


def _trainer(
    max_epochs: int, callbacks: list[Callback], trainer_options: dict[str, Any]
) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,  # the plan shows one bar per run, updated per epoch
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the plan shares the cells out itself
        **trainer_options,
    )


def _split(n_cells: int, validation_fraction: float, seed: int, split_seed: int | None):
    rng = np.random.default_rng(seed if split_seed is None else split_seed)
    order = rng.permutation(n_cells)
    n_val = int(round(validation_fraction * n_cells))
    if n_val and n_cells - n_val < 2:
        raise ValueError("too few cells left for training after the validation split")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _check_options(options: dict[str, Any]) -> None:
    if options["max_epochs"] < 1 or options["batch_size"] < 1:
        raise ValueError("max_epochs and batch_size must be >= 1")
    if not 0.0 <= options["validation_fraction"] < 1.0:
        raise ValueError(
            f"validation_fraction must be in [0, 1), got {options['validation_fraction']}"
        )
    if int(options["validation_particles"]) < 1:
        raise ValueError(
            f"validation_particles must be >= 1, got {options['validation_particles']}"
        )
    callbacks = options["callbacks"]
    if callbacks is not None and not all(isinstance(c, Callback) for c in callbacks):
        raise TypeError("callbacks must be a list of lightning.pytorch.callbacks.Callback objects")


def train_model(model: Any, cells: Any, **options: Any) -> pd.DataFrame:
    """Train a pybivi model (the body of ``BaseModel.train``; see there for ``options``).

    ``cells`` is the :class:`pybivi.data.CellData` of the model's training AnnData.
    """
    from pybivi import diagnostics

    if options["validation_fraction"] is None:
        options["validation_fraction"] = 0.1 if options["early_stopping"] else 0.0
    if options["kl_warmup_epochs"] is None:
        options["kl_warmup_epochs"] = max(1, options["max_epochs"] // 4)
    _check_options(options)
    accelerator, devices = resolve_accelerator(
        options["device"], options["accelerator"], options["devices"]
    )
    seed, batch_size = int(options["seed"]), int(options["batch_size"])
    train_idx, val_idx = _split(
        model.registry.n_cells, options["validation_fraction"], seed, options["split_seed"]
    )
    settings = PlanSettings(
        lr=options["lr"], weight_decay=options["weight_decay"],
        kl_warmup_epochs=options["kl_warmup_epochs"], min_kl_weight=options["min_kl_weight"],
        early_stopping=options["early_stopping"], patience=options["early_stopping_patience"],
        seed=seed, validation_particles=int(options["validation_particles"]),
        validation_batch_size=max(batch_size, 512), progress_bar=options["progress_bar"],
        fingerprint={
            "model": type(model).__name__, "module": type(model.module).__qualname__,
            "n_cells": int(model.registry.n_cells), "n_genes": int(model.registry.n_genes),
            "seed": seed, "batch_size": batch_size,
            "train_cells": zlib.crc32(train_idx.astype(np.int64).tobytes()),
        },
    )
    previous = model.history.to_dict("records") if len(model.history) else []
    plan = ElboTrainingPlan(
        model.module, cells, train_idx, val_idx, batch_size, settings, previous
    )
    trainer_options = {
        "accelerator": accelerator, "devices": devices, "strategy": options["strategy"],
        "num_nodes": int(options["num_nodes"]), "precision": options["precision"],
    }
    model.module.train()  # earlier runs leave it in eval mode
    try:
        with diagnostics.quiet_backend(model.module):
            device = run_plan(
                plan, options["max_epochs"], trainer_options, options["callbacks"] or (),
                options["checkpoint_dir"], options["resume"],
            )
    finally:
        model.module.eval()
        forget_params(model.module)
    model.to(device)
    model.train_indices, model.validation_indices = train_idx, val_idx
    model.history = _history(plan.previous_history, plan.rows)
    model.is_trained = True
    diagnostics.after_training(model)
    return model.history


def _history(previous: list[dict[str, Any]], rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Earlier runs' rows, then this run's with epochs numbered on from them."""
    before = pd.DataFrame(previous, columns=HISTORY_COLUMNS)
    now = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    if len(before):
        now["epoch"] += int(before["epoch"].max()) + 1
    out = pd.concat([before, now], ignore_index=True) if len(before) else now
    out["epoch"] = out["epoch"].astype(int)
    return out
