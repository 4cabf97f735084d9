"""Streamed passes over the cells of many sets at once, for the group-level tests.

:func:`pseudobulk_moments` reads the counts once and keeps, per set of cells, the sums
that give each species' mean normalised expression and its sampling (co)variance;
:func:`group_log2_draws` does the same with the model's posterior draws of decoded
quantities. A cell may belong to several sets (a group, the reference, and the
control-versus-control splits of :func:`null_splits`); memory holds per-set sums only.
:class:`DecodeSettings` says which cells count and at which batch they are decoded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from pybivi.tl._de_sources import is_idata

__all__ = [
    "AGGREGATIONS",
    "DecodeSettings",
    "null_splits",
    "pseudobulk_moments",
    "group_log2_draws",
]

AGGREGATIONS = ("pseudobulk", "log_mean")
SPECIES = ("nascent", "mature")


# eq=False: the weights are an array, which has no single truth value to compare by.
@dataclasses.dataclass(frozen=True, eq=False)
class DecodeSettings:
    """Which cells count and where they are decoded: what every differential test passes on.

    Attributes
    ----------
    cell_weights
        Weight of every cell (row of the model's AnnData, or cell position of an
        InferenceData), or ``None`` for all cells alike: group means are weighted, and a
        cell of weight 0 leaves the test (see :mod:`pybivi.tl._de_weights`).
    transform_batch
        Models set up with ``batch_key``: the batch (or a list of them, averaged) every
        cell is decoded at (:func:`pybivi.posterior.iter_draws`); ``None``: each cell at
        its own batch.
    """

    cell_weights: np.ndarray | None = None
    transform_batch: Any = None


def null_splits(
    reference_rows: np.ndarray,
    group_sizes: Mapping[str, int],
    n_repeats: int,
    rng: np.random.Generator,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Control-versus-control splits: per group and repeat, a size-matched subset of the
    reference cells and the rest of them.

    A group larger than half the reference is matched by half of it, so that both sides
    keep cells. Keys are ``"<group>/<repeat>"``.
    """
    reference_rows = np.asarray(reference_rows, dtype=np.int64)
    if reference_rows.size < 4:
        raise ValueError(
            f"the empirical null needs at least 4 reference cells, got {reference_rows.size}"
        )
    out = {}
    for name, size in group_sizes.items():
        size = int(min(size, reference_rows.size // 2))
        for r in range(n_repeats):
            picked = rng.permutation(reference_rows)
            out[f"{name}/{r}"] = (np.sort(picked[:size]), np.sort(picked[size:]))
    return out


# ------------------------------------------------------------------------ streamed passes
def _membership(
    sets: Mapping[str, np.ndarray],
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Rows of all sets (sorted, unique), each set's mask over them, and a row -> position
    lookup (-1 for rows in no set)."""
    sets = {k: np.unique(np.asarray(v, dtype=np.int64)) for k, v in sets.items()}
    empty = [k for k, v in sets.items() if v.size == 0]
    if empty:
        raise ValueError(f"cell sets without cells: {empty[:5]}")
    rows = np.unique(np.concatenate(list(sets.values())))
    position = np.full(rows.max() + 1, -1, dtype=np.int64)
    position[rows] = np.arange(rows.size)
    return rows, {k: np.isin(rows, v) for k, v in sets.items()}, position


def _count_chunks(
    source: Any, rows: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """``(rows, {species: counts / library * reference library}, {species: library /
    reference library})``, one chunk at a time."""
    if is_idata(source):
        observed = getattr(source, "observed_data", None)
        if observed is None or not ({"x", "x_mature"} & set(observed.data_vars)):
            raise ValueError(
                "the InferenceData has no observed counts: export it with model.posterior(...), "
                "or test it with estimate='decoded'"
            )
        const = source.constant_data
        if "x" in observed:
            x = observed["x"]
            species = [str(s) for s in x["species"].values]
        else:
            x, species = observed["x_mature"].expand_dims(species=["mature"], axis=-1), ["mature"]
        for start in range(0, rows.size, batch_size):
            chunk = rows[start : start + batch_size]
            block = np.asarray(x.isel(cell=chunk).transpose("cell", "gene", "species").values)
            out, size = {}, {}
            for i, s in enumerate(species):
                lib = np.asarray(const[f"library_{s}"].values, dtype=np.float64)[chunk]
                ref = float(const[f"reference_library_{s}"])
                out[s] = block[..., i].astype(np.float64) / lib[:, None] * ref
                size[s] = lib / ref
            yield chunk, out, size
        return
    ref = source.registry.reference_library
    for batch in source.make_batches(indices=rows, batch_size=batch_size):
        out, size = {}, {}
        for s in SPECIES:
            if f"x_{s}" in batch:
                x = batch[f"x_{s}"].double().cpu().numpy()
                lib = batch[f"library_{s}"].double().cpu().numpy()
                out[s] = x / lib[:, None] * float(ref[s])
                size[s] = lib / float(ref[s])
        yield batch["index"].cpu().numpy(), out, size


def pseudobulk_moments(
    source: Any,
    sets: Mapping[str, np.ndarray],
    batch_size: int = 256,
    weights: np.ndarray | None = None,
    library_weighted: bool = True,
) -> dict[str, dict[str, np.ndarray]]:
    """Means and sampling (co)variances of each set's normalised pseudo-bulk, one pass.

    Parameters
    ----------
    source
        A fitted model (its AnnData's counts) or an InferenceData (``observed_data``).
    sets
        Name to rows (model) or cell positions (InferenceData).
    batch_size
        Cells per chunk.
    weights
        Optional weight of every row (cell position): the pseudo-bulks are weighted
        means; 0/1 weights give exactly the moments of the subset.
    library_weighted
        ``True``: each species' pseudo-bulk is its summed counts over its summed library
        sizes (times the reference library), the classic pseudo-bulk and the
        maximum-likelihood mean of Poisson counts, i.e. the cells' normalised counts
        weighted by their library sizes. ``False``: the plain mean of the cells'
        normalised counts, which gives a small-library cell's noisy ratio the weight of
        any other.

    Returns
    -------
    dict
        Per set: ``n`` (the summed weight: the number of cells without weights) and, per
        species ``s``, ``mean_s`` (the normalised pseudo-bulk) and ``var_log_s``
        (sampling variance of its natural log: the linearisation variance of a ratio
        estimator, then the delta method), plus ``cov_log`` between the species.
    """
    rows, members, position = _membership(sets)
    sums: dict[str, dict[str, Any]] = {k: {} for k in members}
    for chunk_rows, values, sizes in _count_chunks(source, rows, batch_size):
        pos = position[chunk_rows]
        cell_w = None if weights is None else np.asarray(weights, np.float64)[chunk_rows]
        for k, member in members.items():
            inside = member[pos]
            if not inside.any():
                continue
            w = np.ones(int(inside.sum())) if cell_w is None else cell_w[inside]
            species_w = {s: w * sizes[s][inside] if library_weighted else w for s in values}
            _accumulate(sums[k], values, inside, w, species_w)
    return {k: _moments(acc) for k, acc in sums.items()}


def _add(acc: dict[str, Any], key: str, value: Any) -> None:
    acc[key] = acc.get(key, 0.0) + value


def _accumulate(
    acc: dict[str, Any],
    values: dict[str, np.ndarray],
    inside: np.ndarray,
    w: np.ndarray,
    species_w: dict[str, np.ndarray],
) -> None:
    """Add one chunk's weighted sums of the cells ``inside`` to a set's accumulator.

    ``species_w[s]`` weighs the cells in species ``s``'s mean. Kept: the sums of
    ``v``, ``v y``, ``v^2``, ``v^2 y``, ``v^2 y^2`` per species and the cross-species
    sums of ``v_N v_M`` times ``1``, ``y_N``, ``y_M`` and ``y_N y_M`` (``v``: the weight,
    ``y``: the normalised count), which give the linearisation (co)variances.
    """
    _add(acc, "n", float(w.sum()))
    ys = {s: y[inside] for s, y in values.items()}
    for s, y in ys.items():
        v = species_w[s][:, None]
        v2 = v * v
        _add(acc, f"v_{s}", float(v.sum()))
        _add(acc, f"vy_{s}", (v * y).sum(0))
        _add(acc, f"v2_{s}", float(v2.sum()))
        _add(acc, f"v2y_{s}", (v2 * y).sum(0))
        _add(acc, f"v2yy_{s}", (v2 * y * y).sum(0))
    if len(ys) == 2:
        vv = (species_w["nascent"] * species_w["mature"])[:, None]
        yn, ym = ys["nascent"], ys["mature"]
        _add(acc, "vv", float(vv.sum()))
        _add(acc, "vv_n", (vv * yn).sum(0))
        _add(acc, "vv_m", (vv * ym).sum(0))
        _add(acc, "vv_nm", (vv * yn * ym).sum(0))


def _moments(acc: dict[str, Any]) -> dict[str, Any]:
    """Means and delta-method log variances from a set's weighted sums.

    For a weighted mean ``m = sum v y / sum v`` the linearisation variance is
    ``sum v^2 (y - m)^2 / (sum v)^2``; with unit weights it is the sample variance over
    the number of cells.
    """
    res: dict[str, Any] = {"n": acc["n"]}
    species = [s for s in SPECIES if f"v_{s}" in acc]
    for s in species:
        total = acc[f"v_{s}"]
        mean = acc[f"vy_{s}"] / total
        spread = acc[f"v2yy_{s}"] - 2 * mean * acc[f"v2y_{s}"] + mean**2 * acc[f"v2_{s}"]
        res[f"mean_{s}"] = mean
        with np.errstate(divide="ignore", invalid="ignore"):
            res[f"var_log_{s}"] = np.maximum(spread, 0.0) / (total**2 * mean**2)
    if len(species) == 2:
        mn, mm = res["mean_nascent"], res["mean_mature"]
        joint = acc["vv_nm"] - mm * acc["vv_n"] - mn * acc["vv_m"] + mn * mm * acc["vv"]
        with np.errstate(divide="ignore", invalid="ignore"):
            res["cov_log"] = joint / (acc["v_nascent"] * acc["v_mature"] * mn * mm)
    return res


def _model_draw_chunks(
    model: Any,
    rows: np.ndarray,
    names: Sequence[str],
    n_draws: int,
    batch_size: int,
    seed: int,
    decode: DecodeSettings,
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    from pybivi._draws import iter_draws

    for batch, draws in iter_draws(
        model,
        rows,
        n_draws,
        quantities=names,
        libraries=("reference",),
        batch_size=batch_size,
        seed=seed,
        transform_batch=decode.transform_batch,
    ):
        values = {q: draws["reference"][q].double().cpu().numpy() for q in names}
        yield batch["index"].cpu().numpy(), values


def _idata_draw_chunks(
    idata: Any, rows: np.ndarray, names: Sequence[str], batch_size: int
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    post = idata.posterior
    for start in range(0, rows.size, batch_size):
        chunk = rows[start : start + batch_size]
        values = {}
        for q in names:
            da = post[q]
            if "library" in da.dims:
                lib = "reference" if "reference" in da["library"] else da["library"].values[0]
                da = da.sel(library=lib)
            v = np.asarray(
                da.isel(cell=chunk).transpose("chain", "draw", "cell", "gene").values,
                dtype=np.float64,
            )
            values[q] = v.reshape(-1, *v.shape[2:])
        yield chunk, values


def group_log2_draws(
    source: Any,
    sets: Mapping[str, np.ndarray],
    quantities: Sequence[str],
    *,
    aggregate: str = "pseudobulk",
    n_draws: int = 100,
    batch_size: int = 256,
    seed: int = 0,
    decode: DecodeSettings | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Posterior draws of each set's population-level log2 values of ``quantities``.

    For every draw (one draw of every cell's latents), ``"pseudobulk"`` is the log2 of
    the mean over the set's cells, ``"log_mean"`` the mean of the cells' log2 values.

    Parameters
    ----------
    source
        A fitted model (``n_draws`` draws per cell are made) or an InferenceData (its
        ``chain x draw`` draws are read; ``sets`` index its ``cell`` axis).
    sets
        Name to rows (a cell may belong to several sets).
    quantities
        Per cell-and-gene quantities at the reference library (``mean_nascent``,
        ``burst_size``, ...).
    aggregate
        ``"pseudobulk"`` or ``"log_mean"``.
    n_draws, batch_size, seed
        Draws per cell (model source), cells per chunk, seed of the draws.
    decode
        The cells' weights (the means over a set's cells are weighted) and, for a model
        source, the batch to decode at; ``None``: all cells alike, each at its own batch.

    Returns
    -------
    dict
        ``{set: {quantity: (n_draws, n_genes) log2 values}}``.
    """
    if aggregate not in AGGREGATIONS:
        raise ValueError(f"aggregate must be one of {AGGREGATIONS}, not {aggregate!r}")
    if n_draws < 2:
        raise ValueError(f"n_draws must be >= 2 to describe a posterior, got {n_draws}")
    decode = DecodeSettings() if decode is None else decode
    rows, members, position = _membership(sets)
    if is_idata(source):
        if decode.transform_batch is not None:
            raise ValueError(
                "transform_batch needs a model; an InferenceData holds the batch it was "
                "exported at (model.posterior(transform_batch=...))"
            )
        chunks = _idata_draw_chunks(source, rows, quantities, batch_size)
    else:
        chunks = _model_draw_chunks(source, rows, quantities, n_draws, batch_size, seed, decode)
    counts: dict[str, float] = {}
    sums: dict[str, dict[str, np.ndarray]] = {k: {} for k in members}
    weights = decode.cell_weights
    for chunk_rows, values in chunks:
        pos = position[chunk_rows]
        cell_w = None if weights is None else np.asarray(weights, np.float64)[chunk_rows]
        if aggregate == "log_mean":
            values = {q: np.log2(v) for q, v in values.items()}
        for k, member in members.items():
            inside = member[pos]
            if not inside.any():
                continue
            if cell_w is None:
                counts[k] = counts.get(k, 0) + int(inside.sum())
                for q, v in values.items():
                    sums[k][q] = sums[k].get(q, 0.0) + v[:, inside, :].sum(1)
                continue
            w = cell_w[inside]
            counts[k] = counts.get(k, 0.0) + float(w.sum())
            for q, v in values.items():
                sums[k][q] = sums[k].get(q, 0.0) + (v[:, inside, :] * w[:, None]).sum(1)
    out = {}
    for k, acc in sums.items():
        means = {q: v / counts[k] for q, v in acc.items()}
        out[k] = means if aggregate == "log_mean" else {q: np.log2(v) for q, v in means.items()}
    return out
