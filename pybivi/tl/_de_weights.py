"""Per-cell weights of the differential tests: responders, escapers and user weights.

A CRISPRi/a cell may carry its guide and show no effect (an escaper); pooled with the
responders it pulls a group's pseudo-bulk toward the controls and dilutes every fold
change. :func:`resolve_cell_weights` turns the user's ``weights=`` / ``responders=`` (or,
for a model built with ``salient_prior="mixture"``, its responder probabilities) into one
weight per cell; control cells always weigh 1 (they are never dropped). The group test
forms weighted pseudo-bulks with them (:mod:`pybivi.tl._de_streams`), the pooled-pairs
test draws its cells with them (:func:`thin_masks`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pybivi.tl._de_sources import Sampler, is_idata

__all__ = [
    "RESPONDER_THRESHOLD",
    "cell_weights_for",
    "resolve_cell_weights",
    "restrict_masks",
    "thin_masks",
]

#: A cell counts as a responder by default when its responder probability exceeds this.
RESPONDER_THRESHOLD = 0.5


def _as_vector(values: Any, n_cells: int, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != n_cells:
        raise ValueError(f"{name} must have one entry per cell ({n_cells}), got shape {arr.shape}")
    return arr


def resolve_cell_weights(
    source: Any,
    n_cells: int,
    is_control: np.ndarray | None,
    weights: Any = None,
    responders: Any = None,
) -> np.ndarray | None:
    """One weight in ``[0, 1]`` per cell, or ``None`` when every cell weighs 1.

    Parameters
    ----------
    source
        The model or InferenceData under test.
    n_cells
        Number of cells of ``source`` (the length of ``weights``/``responders``).
    is_control
        Boolean mask of the control cells (they weigh 1 whatever was given), or ``None``.
    weights
        Per-cell weights in ``[0, 1]`` (e.g. ``model.get_perturbation_probability()``).
    responders
        ``None``: automatic (a model built with ``salient_prior="mixture"`` keeps the cells
        whose responder probability exceeds :data:`RESPONDER_THRESHOLD`; otherwise every
        cell); ``False``: every cell; ``True``: the model's responders (an error without a
        mixture prior); a boolean mask: those cells.

    Raises
    ------
    ValueError
        Both ``weights`` and ``responders`` given; a wrong length; weights outside
        ``[0, 1]`` or not finite; a non-boolean mask; ``responders=True`` without a
        mixture-prior model.
    """
    if weights is not None and responders is not None and responders is not False:
        raise ValueError("pass weights= or responders=, not both")
    if weights is not None:
        w = _as_vector(weights, n_cells, "weights").astype(np.float64)
        if not np.all(np.isfinite(w)) or np.any((w < 0) | (w > 1)):
            raise ValueError("weights must be finite numbers in [0, 1]")
    elif responders is False:
        return None
    elif responders is None or responders is True:
        has_mixture = (
            not is_idata(source)
            and getattr(source.module, "salient_prior_kind", None) == "mixture"
        )
        if not has_mixture:
            if responders is True:
                raise ValueError(
                    "responders=True needs a model built with salient_prior='mixture'; "
                    "pass a boolean mask or weights= instead"
                )
            return None
        prob = source.get_perturbation_probability()
        w = (prob > RESPONDER_THRESHOLD).astype(np.float64)
    else:
        mask = _as_vector(responders, n_cells, "responders")
        if mask.dtype != bool:
            raise ValueError(
                f"responders must be a boolean mask (or None/True/False), got dtype {mask.dtype}"
            )
        w = mask.astype(np.float64)
    if is_control is not None:
        w = np.where(np.asarray(is_control, dtype=bool), 1.0, w)  # controls are never dropped
    return w


def cell_weights_for(
    source: Any, groupby: str, weights: Any = None, responders: Any = None
) -> np.ndarray | None:
    """:func:`resolve_cell_weights` for the cells of a model or InferenceData."""
    sampler = Sampler(source, groupby, 1, 0, 1)  # reads the labels only
    return resolve_cell_weights(
        source, len(sampler.labels), sampler.is_control, weights, responders
    )


def restrict_masks(
    ref_mask: np.ndarray, masks: dict[str, np.ndarray], weights: np.ndarray | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Drop the cells of weight 0 from the reference and the groups (none may empty)."""
    if weights is None:
        return ref_mask, masks
    keep = weights > 0
    ref_mask, masks = ref_mask & keep, {g: m & keep for g, m in masks.items()}
    empty = [g for g, m in masks.items() if not m.any()]
    if empty or not ref_mask.any():
        which = empty[:5] if empty else ["the reference"]
        raise ValueError(f"no cells of positive weight (no responders) left in {which}")
    return ref_mask, masks


def effective_sizes(masks: dict[str, np.ndarray], weights: np.ndarray | None) -> dict[str, int]:
    """Kish's effective number of cells ``(sum w)^2 / sum w^2`` of each group."""
    if weights is None:
        return {g: int(m.sum()) for g, m in masks.items()}
    out = {}
    for g, m in masks.items():
        w = weights[m]
        out[g] = max(1, int(round(w.sum() ** 2 / np.sum(w * w))))
    return out


def thin_masks(
    ref_mask: np.ndarray,
    masks: dict[str, np.ndarray],
    weights: np.ndarray | None,
    seed: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Keep each cell with probability equal to its weight (0/1 weights: exactly the subset).

    The pooled-pairs tests pool posterior draws of a group's cells; keeping a random
    subset by weight pools draws of the weighted population.
    """
    if weights is None:
        return ref_mask, masks
    uniform = np.random.default_rng([int(seed), 0xE5C]).random(weights.shape[0])
    return restrict_masks(ref_mask, masks, (uniform < weights).astype(np.float64))
