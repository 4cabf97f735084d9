"""Minibatches of the training cells for one process of a (possibly data-parallel) run.

Data parallelism: every epoch the training cells are shuffled with a generator seeded by
``(seed, epoch)`` (the same on every process), and process ``r`` of ``N`` takes the
``r``-th of ``N`` equal parts. The ``"cells"`` plate keeps the size of the full training
set, so each process's minibatch ELBO is an unbiased estimate of the full-data ELBO and
the average of the processes' gradients (what DDP computes) is one for the union of
their minibatches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from pybivi.storage import shuffled_blocks

__all__ = ["ShardedCells", "rank_and_world"]


def rank_and_world(plan: Any) -> tuple[int, int]:
    """``(global rank, world size)`` of the plan's trainer; ``(0, 1)`` outside training."""
    trainer = getattr(plan, "_trainer", None)
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(trainer.world_size)


class ShardedCells:
    """This process's training minibatches of the current epoch (an iterable for Lightning).

    Parameters
    ----------
    cells
        The training AnnData's :class:`pybivi.data.CellData`.
    indices
        Rows of the training cells.
    batch_size
        Cells per optimisation step over all processes; each of ``N`` processes takes
        ``batch_size // N`` of them.
    seed
        Seed of the per-epoch shuffle (combined with the epoch number).
    plan
        The training plan: gives the process's rank and its device.
    """

    def __init__(
        self, cells: Any, indices: np.ndarray, batch_size: int, seed: int, plan: Any
    ) -> None:
        self.cells, self.indices = cells, np.asarray(indices, dtype=np.int64)
        self.batch_size, self.seed, self.plan = int(batch_size), int(seed), plan
        #: the epoch being trained (set by the plan when each epoch starts)
        self.epoch = 0

    def share(self, epoch: int) -> np.ndarray:
        """Rows this process trains on in ``epoch`` (equal, disjoint shares over processes).

        The cells are shuffled one by one, or, when the data's ``block_size`` is set (the
        default on disk), as shuffled blocks of contiguous rows (:func:`~pybivi.storage.
        shuffled_blocks`), so that each group of loaded blocks is read in a few runs.
        """
        rng = np.random.default_rng([self.seed, int(epoch)])
        block_size = getattr(self.cells, "block_size", None)
        if block_size is None:
            order = rng.permutation(self.indices)
        else:
            order = shuffled_blocks(self.indices, int(block_size), self.cells.load_blocks, rng)
        rank, world = rank_and_world(self.plan)
        if world == 1:
            return order
        # Equal shares keep the processes in step (each one runs the same number of steps);
        # the up to world - 1 cells left over differ from epoch to epoch.
        per = len(order) // world
        return order[rank * per : (rank + 1) * per]

    def _process_batch_size(self) -> int:
        return max(1, self.batch_size // rank_and_world(self.plan)[1])

    def __len__(self) -> int:
        _, world = rank_and_world(self.plan)
        n = len(self.indices) if world == 1 else len(self.indices) // world
        size = self._process_batch_size()
        full, rest = divmod(n, size)
        return full + (1 if rest > 1 or (rest == 1 and n == 1) else 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # A generator: Lightning may create the iterator before the epoch starts (it does
        # when resuming), so the epoch's share is drawn at the first batch, not here.
        yield from self.cells.iterate(
            self.share(self.epoch),
            self._process_batch_size(),
            shuffle=False,
            device=self.plan.device,
            drop_singleton=True,
        )
