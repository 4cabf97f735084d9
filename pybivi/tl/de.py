"""Differential tests of groups of cells: kinetic parameters and mean expression.

Two functions, each with two methods:

* :func:`kinetic` -- which genes change a reaction scheme's kinetic parameters (for the
  bursty scheme the burst size ``b`` and the relative degradation rate ``gamma/k``)
  between each group and a reference. Default ``method="group"``: population-level
  parameters from each group's pseudo-bulk at the reference library, adaptive shrinkage
  across genes of each gene's parameter changes together, a three-way test at
  ``delta = 0.5`` and calls under posterior expected FDR control, checked on
  control-versus-control splits (:mod:`pybivi.tl.de`).
  ``method="pairs"``: biVI's procedure as in the ContrastiveBiVI paper (appendix E):
  pooled samples, random pairs, the Bayes factor of ``|lfc| >= delta`` against
  ``|lfc| < delta``, ``delta = 1``, call where ``BF > 3``.
* :func:`mean` -- the same on normalised mature expression ``rho_M`` (any model). Its
  ``method="pairs"`` is scvi-tools' ``change`` mode: ``lfc = log2(a + eps) -
  log2(b + eps)``, ``P(DE) = max(P(lfc >= delta), P(lfc < -delta))``, the Bayes factor
  the odds ``P / (1 - P)``, ``delta = 0.2``, call where ``BF > 2`` (the paper's rule as
  stated). scvi-tools reports the natural log of the odds in its ``bayes_factor``
  column: our ``log_bayes_factor`` column is that number.

The maths lives in pure functions on arrays in :mod:`pybivi.tl.bayes_factors`
(:func:`~pybivi.tl.bayes_factors.kinetic_bayes_factors`,
:func:`~pybivi.tl.bayes_factors.change_bayes_factors`, ``three_way_test``, ``fdr_calls``,
``shrink_lfc``, ``shrink_lfc_joint``), tested against analytic cases; the two methods
draw or read the inputs (:mod:`pybivi.tl._de_sources`, :mod:`pybivi.tl._de_streams`) and
assemble tables, the group method in :mod:`pybivi.tl._de_group` and the pairs method in
:mod:`pybivi.tl._de_pairs`. The functions here check the arguments, resolve the cell
weights and choose the method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from pybivi.tl._de_group import GROUP_DELTA, group_test
from pybivi.tl._de_pairs import kinetic_pairs, mean_pairs
from pybivi.tl._de_streams import DecodeSettings
from pybivi.tl._de_summary import call_counts, overlap_table
from pybivi.tl._de_weights import cell_weights_for

# The Bayes-factor functions belong to pybivi.tl.bayes_factors; they stay importable from
# here, where earlier versions listed them.
from pybivi.tl.bayes_factors import change_bayes_factors as change_bayes_factors
from pybivi.tl.bayes_factors import combined_call as combined_call
from pybivi.tl.bayes_factors import estimate_pseudocounts as estimate_pseudocounts
from pybivi.tl.bayes_factors import kinetic_bayes_factors as kinetic_bayes_factors
from pybivi.tl.bayes_factors import median_ratio_normalize as median_ratio_normalize

__all__ = ["kinetic", "mean", "group_test", "GROUP_DELTA", "call_counts", "overlap_table"]

# Parameter texts that kinetic and mean share, written once and put into both docstrings
# (as scvi-tools' doc templates) so that the two cannot drift apart.
_SHARED_PARAMETERS = {
    "weights_responders": """\
weights, responders
    Per-cell weights (beyond the paper; user guide, "Escapers"): ``weights`` in
    ``[0, 1]`` (e.g. ``model.get_perturbation_probability()``) or ``responders``, a
    boolean mask, one entry per cell of the model's AnnData (or the InferenceData).
    ``"group"`` forms weighted pseudo-bulks (0/1 weights: exactly the test on the
    subset); ``"pairs"`` keeps each cell with probability equal to its weight.
    Controls always weigh 1; the control-versus-control null is unchanged. Default
    (``responders=None``): a model built with ``salient_prior="mixture"`` tests its
    responders, the cells whose responder probability exceeds 0.5; every other
    source tests all cells. ``responders=False`` switches this off.""",
    "transform_batch": """\
transform_batch
    Models set up with ``batch_key``: where decoding happens (``"pairs"``, and
    ``"group"`` with ``estimate="decoded"``), decode every cell at this batch, or
    average over a list of batches (scvi-tools' ``transform_batch``); ``None``:
    each cell at its own batch. The observed ``"group"`` test instead compares
    pseudo-bulks within each batch and combines the batches' lfc with
    inverse-variance weights, so a batch effect shared by group and reference
    cancels (:mod:`pybivi.tl._de_batches`).""",
}


def _shared_parameters(func: Callable) -> Callable:
    """Put the :data:`_SHARED_PARAMETERS` texts in place of ``{name}`` in ``func``'s docstring."""
    if func.__doc__ is None:  # python -OO strips docstrings
        return func
    doc = func.__doc__
    for name, text in _SHARED_PARAMETERS.items():
        placeholder = "{" + name + "}"
        if placeholder not in doc:
            raise ValueError(f"{func.__name__}'s docstring has no {placeholder}")
        # A docstring's parameters sit 4 spaces in: the first line is already indented.
        doc = doc.replace(placeholder, "\n".join("    " + line for line in text.splitlines())[4:])
    func.__doc__ = doc
    return func


@_shared_parameters
def kinetic(
    model_or_idata: Any,
    groupby: str = "program",
    group: str | Sequence[str] | None = None,
    reference: str = "control",
    *,
    params: Sequence[str] | None = None,
    method: str = "group",
    estimate: str = "observed",
    delta: float | None = None,
    fdr_target: float | None = 0.05,
    shrink: bool | str = True,
    null_repeats: int = 3,
    aggregate: str = "pseudobulk",
    n_draws: int = 100,
    n_posterior: int = 1000,
    credible_mass: float = 0.95,
    bf_threshold: float = 3.0,
    n_pairs: int = 10_000,
    n_samples: int = 5_000,
    normalize: str | None = None,
    batch_size: int = 256,
    seed: int = 0,
    weights: Any = None,
    responders: Any = None,
    transform_batch: Any = None,
) -> pd.DataFrame:
    """Kinetic differential test of groups of cells against a reference.

    Two methods (the user guide's "Kinetic calls" section compares them):

    * ``"group"`` (default): each group's population-level kinetic parameters at the
      reference library (the scheme's kinetic map of its mean normalised nascent and
      mature expression), their log2 fold change against the reference, its sampling
      uncertainty, empirical-Bayes shrinkage across genes, a three-way test
      (``P(lfc >= delta)``, ``P(lfc <= -delta)``, ``P(|lfc| < delta)``) and calls under
      posterior expected false-discovery-rate control (``fdr_target``). The same test on
      control-versus-control splits (random reference subsets, size-matched to each
      group, against the rest of the reference) gives each group's null call rate. See
      :mod:`pybivi.tl.de`.
    * ``"pairs"``: biVI's procedure as in the ContrastiveBiVI paper (appendix E): pooled
      draws of the two groups' cells, ``n_pairs`` random pairs, the Bayes factor of
      ``|lfc| >= delta`` against ``|lfc| < delta``, calls where it exceeds
      ``bf_threshold`` (paper: ``delta = 1``, ``BF > 3``).

    Parameters
    ----------
    model_or_idata
        A fitted model with a reaction scheme, or an InferenceData from
        ``model.posterior(groupby=...)`` (its reference-library draws, and for
        ``"group"`` its observed counts and libraries, are used).
    groupby
        ``obs`` column (``constant_data`` variable) defining the groups.
    group
        One group, a list, or ``None`` for every group other than the reference.
    reference
        Value of ``groupby`` to compare against; ``"control"`` also means the model's
        control cells when no group has that name.
    params
        Kinetic parameters to test (default: burst size and relative degradation rate
        for the bursty scheme, otherwise every kinetic parameter of the scheme).
    method
        ``"group"`` or ``"pairs"``.
    estimate
        ``"group"``: where the groups' mean expression comes from. ``"observed"``
        (default): the counts, each cell scaled to the reference library.
        ``"decoded"``: the model's posterior draws of the decoded means (``n_draws``
        per cell, averaged over the group's cells draw by draw, ``aggregate``), with
        the counts' sampling variance added to the draws'.
    delta
        Half-width of the region of practical equivalence on the log2 fold change
        (default: :data:`~pybivi.tl.de.GROUP_DELTA` = 0.5 for ``"group"``, the
        paper's 1 for ``"pairs"``).
    fdr_target
        ``"group"``: bound on the posterior expected FDR of each group's calls per
        parameter (:func:`~pybivi.tl.bayes_factors.fdr_calls`); ``None`` calls where the
        Bayes factor exceeds ``bf_threshold`` instead. Ignored by ``"pairs"``.
    shrink
        ``"group"``: shrink the lfc with an empirical-Bayes prior fitted to all genes.
        ``True`` (default) or ``"joint"``: with two parameters or more, one prior over
        each gene's vector of parameter changes, with their covariance
        (:func:`~pybivi.tl.bayes_factors.shrink_lfc_joint`, multivariate adaptive
        shrinkage, Urbut et al. 2019); ``"separate"``: one prior per parameter
        (:func:`~pybivi.tl.bayes_factors.shrink_lfc`, Stephens 2017). ``False`` takes a
        flat prior, whose posterior probabilities are not calibrated across genes (noisy
        silent genes then look differential).
    null_repeats
        ``"group"``: control-versus-control splits per group (0: no null).
    aggregate
        ``estimate="decoded"``: ``"pseudobulk"`` (mean decoded expression, then the
        kinetic map) or ``"log_mean"`` (mean of the cells' log parameters).
    n_draws
        ``estimate="decoded"``: posterior draws per cell.
    n_posterior
        ``"group"``: draws of each gene's shrunken posterior behind the probabilities.
    credible_mass
        ``"group"``: mass of the equal-tailed credible interval of the lfc.
    bf_threshold
        Calling threshold on the Bayes factor (``"pairs"``; ``"group"`` with
        ``fdr_target=None``).
    n_pairs, n_samples
        ``"pairs"``: random pairs per gene and parameter; pooled posterior draws per
        group when drawing from a model.
    normalize
        ``None``: values as read at the reference library. ``"median_ratio"`` removes a
        shift shared by every gene (a compositional shift of normalised expression: when
        a program raises a minority of genes, every other gene's share falls). With
        ``"pairs"`` each sample is divided by its median ratio to the reference's
        per-gene median (:func:`~pybivi.tl.bayes_factors.median_ratio_normalize`); with
        ``"group"`` the lfc estimates are centred on their median over genes. Both
        assume that most genes do not change the parameter.
    {weights_responders}
    batch_size, seed
        Cells per minibatch; seed of the draws, the splits and the pairs.
    {transform_batch}

    Returns
    -------
    pandas.DataFrame
        One row per gene and group (index ``gene``), columns ``group``, ``reference``
        and, per parameter ``p``: ``p_lfc_mean``, ``p_lfc_median``, ``p_lfc_sd``,
        ``p_proba_de``, ``p_bayes_factor`` and ``p_is_de``; with ``"group"`` also
        ``p_lfc_low``/``p_lfc_high`` (credible interval), ``p_lfc_estimate`` and
        ``p_lfc_se`` (before shrinkage), ``p_proba_up``, ``p_proba_down``,
        ``p_proba_null``, ``p_log_bayes_factor`` and ``p_null_call_rate`` (the group's
        mean share of genes called on its control-versus-control splits; ``nan``
        without a null). Then ``call``: ``"burst_size only"``, ``"degradation_rate
        only"``, ``"both"`` or ``"none"`` (see :func:`combined_call`).
        ``table.attrs["null_call_rates"]`` holds the null call rate of every split.

    Warns
    -----
    UserWarning
        When a group's null call rate exceeds ``fdr_target``.

    Examples
    --------
    >>> table = pybivi.tl.de.kinetic(model, groupby="program")  # doctest: +SKIP
    >>> table[table["call"] != "none"].groupby("group")["call"].value_counts()  # doctest: +SKIP
    """
    if method not in ("group", "pairs"):
        raise ValueError(f"method must be 'group' or 'pairs', not {method!r}")
    if normalize not in (None, "median_ratio"):
        raise ValueError(f"normalize must be None or 'median_ratio', not {normalize!r}")
    cells = cell_weights_for(model_or_idata, groupby, weights, responders)
    decode = DecodeSettings(cell_weights=cells, transform_batch=transform_batch)
    if method == "pairs":
        return kinetic_pairs(
            model_or_idata, groupby, group, reference, params=params,
            delta=1.0 if delta is None else delta, bf_threshold=bf_threshold,
            n_pairs=n_pairs, n_samples=n_samples, normalize=normalize,
            batch_size=batch_size, seed=seed, decode=decode,
        )  # fmt: skip
    return group_test(
        model_or_idata, groupby, group, reference, kind="kinetic", params=params,
        estimate=estimate, delta=GROUP_DELTA if delta is None else delta,
        fdr_target=fdr_target, shrink=shrink, aggregate=aggregate, n_draws=n_draws,
        n_posterior=n_posterior, null_repeats=null_repeats, credible_mass=credible_mass,
        bf_threshold=bf_threshold, normalize=normalize, batch_size=batch_size, seed=seed,
        decode=decode,
    )  # fmt: skip


@_shared_parameters
def mean(
    model_or_idata: Any,
    groupby: str = "program",
    group: str | Sequence[str] | None = None,
    reference: str = "control",
    *,
    method: str = "group",
    estimate: str = "observed",
    delta: float | None = None,
    fdr_target: float | None = 0.05,
    shrink: bool = True,
    null_repeats: int = 3,
    n_draws: int = 100,
    n_posterior: int = 1000,
    credible_mass: float = 0.95,
    bf_threshold: float = 2.0,
    n_samples: int = 5_000,
    n_pairs: int | None = None,
    pseudocounts: float | None = None,
    threshold_counts: float = 0.01,
    batch_size: int = 256,
    seed: int = 0,
    weights: Any = None,
    responders: Any = None,
    transform_batch: Any = None,
) -> pd.DataFrame:
    """Mean-expression differential test on normalised mature expression ``rho_M``.

    Two methods, as in :func:`kinetic`:

    * ``"group"`` (default): the group-level test of :func:`kinetic` on the groups'
      mean normalised mature expression: log2 fold change, its sampling uncertainty,
      shrinkage across genes, three-way test, calls under posterior expected FDR control
      and a control-versus-control null. Mean and kinetic calls then stand on equal
      terms.
    * ``"pairs"``: scvi-tools' ``change`` mode: pooled posterior draws of ``rho_M``,
      ``lfc = log2(a + eps) - log2(b + eps)``, ``P(DE) = max(P(lfc >= delta),
      P(lfc < -delta))``, Bayes factor the odds ``P / (1 - P)`` (paper: ``delta = 0.2``,
      call where ``BF > 2``).

    Parameters
    ----------
    model_or_idata
        Any fitted model (SCVI, ContrastiveVI, or a bimodal one), or an InferenceData
        with ``mean_mature`` at the reference library (and, for ``"group"``, the
        observed counts).
    groupby, group, reference
        As in :func:`kinetic`.
    method
        ``"group"`` or ``"pairs"``.
    estimate, shrink, null_repeats, n_draws, n_posterior, credible_mass
        ``"group"``: as in :func:`kinetic`.
    delta
        Effect size on the log2 fold change (default 0.5 for ``"group"``, the paper's
        0.2 for ``"pairs"``).
    fdr_target
        ``"group"``: bound on the posterior expected FDR of the calls (``None``: the
        Bayes-factor rule). Ignored by ``"pairs"``, which keeps scvi-tools' rule.
    bf_threshold
        Threshold on the Bayes factor (``"pairs"``; ``"group"`` with ``fdr_target=None``).
    n_samples
        ``"pairs"``: posterior draws of normalised mature expression per group
        (scvi-tools: ``n_samples_overall = 5000``).
    n_pairs
        ``"pairs"``: ``None``: element-wise pairs as in scvi-tools; else that many random
        pairs.
    pseudocounts
        ``"pairs"``: ``eps`` of the lfc; ``None`` estimates it as scvi-tools does from
        genes whose mean observed mature count in a group is below ``threshold_counts``.
    {weights_responders}
    batch_size, seed
        Minibatch size of the draws; seed of the draws and pairs.
    {transform_batch}

    Returns
    -------
    pandas.DataFrame
        Index ``gene``; columns ``group``, ``reference``, ``proba_de``, ``bayes_factor``,
        ``log_bayes_factor``, ``lfc_mean``, ``lfc_median``, ``lfc_sd``, ``is_de``; with
        ``"group"`` the other columns of :func:`kinetic`'s group test without a
        parameter prefix (``proba_up``, ``proba_down``, ``proba_null``, ``lfc_low``,
        ``lfc_high``, ``null_call_rate``, ...); with ``"pairs"`` ``direction``,
        ``scale_group``, ``scale_reference`` and ``pseudocounts`` (scvi-tools 1.4's
        ``bayes_factor`` is our ``log_bayes_factor``).
    """
    if method not in ("group", "pairs"):
        raise ValueError(f"method must be 'group' or 'pairs', not {method!r}")
    cells = cell_weights_for(model_or_idata, groupby, weights, responders)
    decode = DecodeSettings(cell_weights=cells, transform_batch=transform_batch)
    if method == "group":
        return group_test(
            model_or_idata, groupby, group, reference, kind="mean", estimate=estimate,
            delta=GROUP_DELTA if delta is None else delta, fdr_target=fdr_target,
            shrink=shrink, n_draws=n_draws, n_posterior=n_posterior,
            null_repeats=null_repeats, credible_mass=credible_mass,
            bf_threshold=bf_threshold, batch_size=batch_size, seed=seed, decode=decode,
        )  # fmt: skip
    return mean_pairs(
        model_or_idata, groupby, group, reference, delta=0.2 if delta is None else delta,
        bf_threshold=bf_threshold, n_samples=n_samples, n_pairs=n_pairs,
        pseudocounts=pseudocounts, threshold_counts=threshold_counts, batch_size=batch_size,
        seed=seed, decode=decode,
    )  # fmt: skip


# The figure-3 tables and plots live in pybivi.report and the ground-truth scores in
# pybivi.datasets (both build on the tests above); they stay reachable as pybivi.tl.de.<name>.
