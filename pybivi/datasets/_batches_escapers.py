"""Batches and escapers: what :func:`pybivi.datasets.simulate_perturbseq` adds to a screen.

Neither is in the ContrastiveBiVI paper's simulation. Batches (``n_batches``,
``batch_effect``) shift each batch's burst sizes, relative degradation rates and capture;
escapers (``escape_fraction``) are perturbed cells on which the perturbation has no effect.
Each is drawn from its own generator, so a simulation with them shares the rest of its
design with the same simulation without them. Private, like ``_simulation``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "BATCH_EFFECTS",
    "batch_design",
    "batch_truth",
    "draw_responders",
    "resolve_batch_effect",
]

BATCH_EFFECTS = ("burst_size", "degradation", "capture")
"""What a batch effect moves: per batch and gene ``b`` and ``gamma/k``, per batch capture."""


def resolve_batch_effect(batch_effect: float | dict[str, float]) -> dict[str, float]:
    """``{"burst_size", "degradation", "capture"}`` log2 standard deviations (a number sets all)."""
    if isinstance(batch_effect, dict):
        unknown = sorted(set(batch_effect) - set(BATCH_EFFECTS))
        if unknown:
            raise ValueError(f"unknown batch_effect key(s) {unknown}; choose from {BATCH_EFFECTS}")
        out = {k: float(batch_effect.get(k, 0.0)) for k in BATCH_EFFECTS}
    else:
        out = dict.fromkeys(BATCH_EFFECTS, float(batch_effect))
    bad = {k: v for k, v in out.items() if not (np.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(f"batch_effect values must be finite and >= 0, got {bad}")
    return out


def batch_design(
    seed: int, n_draw: int, n_genes: int, n_batches: int, effect: dict[str, float]
) -> dict[str, np.ndarray]:
    """Batch of every drawn cell and the batches' log2 multipliers.

    Drawn from their own generator (seeded by ``seed``), so the rest of a simulation is
    the same with and without batches. Cells are assigned to batches uniformly at random,
    whatever their perturbation (controls and perturbed cells share the batch effects).
    Per batch and gene, ``log2 b`` and ``log2 gamma/k`` shifts are normal with standard
    deviations ``effect["burst_size"]`` and ``effect["degradation"]``; per batch, the
    capture efficiency is multiplied by a log-normal factor (``effect["capture"]``).
    """
    rng = np.random.default_rng([int(seed), 2718])
    return {
        "batch": rng.integers(n_batches, size=n_draw),
        "log2_burst_size": effect["burst_size"] * rng.standard_normal((n_batches, n_genes)),
        "log2_degradation": effect["degradation"] * rng.standard_normal((n_batches, n_genes)),
        "log2_capture": effect["capture"] * rng.standard_normal(n_batches),
    }


def batch_truth(batches: dict[str, np.ndarray], effect: dict[str, float]) -> dict[str, Any]:
    """``uns["simulation"]["batches"]``: the categories, effect sizes and drawn multipliers."""
    n_batches = batches["log2_capture"].size
    return {
        "categories": [f"batch{j + 1}" for j in range(n_batches)],
        "batch_effect": dict(effect),
        "log2_burst_size": batches["log2_burst_size"],
        "log2_degradation": batches["log2_degradation"],
        "log2_capture": batches["log2_capture"],
        "note": "log2 multipliers per batch (rows) and gene (columns) of b and gamma/k, "
        "and per batch of the capture efficiency; shared by controls and perturbed cells.",
    }


def draw_responders(
    perturbation: np.ndarray,
    names: Sequence[str],
    escape_fraction: float | dict[str, float],
    seed: int,
) -> np.ndarray | None:
    """Which drawn cells respond to their perturbation (``None``: every perturbed cell).

    In each targeting perturbation, ``round(fraction x cells)`` cells chosen at random
    escape (no effect); controls (-1) are no responders. The draws come from their own
    generator, so a screen with and without escapers shares its design.
    """
    names = [str(n) for n in names]
    if isinstance(escape_fraction, dict):
        unknown = sorted(set(map(str, escape_fraction)) - set(names))
        if unknown:
            raise ValueError(
                f"escape_fraction names unknown perturbation(s) {unknown[:5]}; "
                f"the perturbations are {names}"
            )
        fractions = np.array([float(escape_fraction.get(n, 0.0)) for n in names])
    else:
        fractions = np.full(len(names), float(escape_fraction))
    if np.any(~np.isfinite(fractions)) or np.any((fractions < 0) | (fractions > 1)):
        raise ValueError(f"escape_fraction must lie in [0, 1], got {escape_fraction!r}")
    if not np.any(fractions > 0):
        return None
    rng = np.random.default_rng([int(seed), 0xE5C])
    responder = perturbation >= 0
    for k, fraction in enumerate(fractions):
        cells = np.flatnonzero(perturbation == k)
        n_escape = int(round(fraction * cells.size))
        responder[rng.choice(cells, size=n_escape, replace=False)] = False
    return responder
