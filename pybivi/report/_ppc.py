"""The report's posterior-predictive section: summary table, figures and text.

Composes :mod:`pybivi.tl.ppc` (the statistics and their calibration) and
:mod:`pybivi.pl` (the figures); reachable as ``pybivi.report.ppc_section``.
"""

from __future__ import annotations

from typing import Any

from pybivi.pl._ppc import calibration as plot_calibration
from pybivi.pl._ppc import ppc as plot_ppc
from pybivi.tl.ppc import PPCResult, expected_coverage, ppc

__all__ = ["section"]


def section(model_or_result: Any, n_replicates: int = 20, seed: int = 0) -> dict[str, Any]:
    """The report's posterior-predictive section: summary table, two figures, a short text.

    Parameters
    ----------
    model_or_result
        A fitted model (checked here with :func:`ppc`) or a :class:`PPCResult`.
    n_replicates, seed
        Passed to :func:`ppc` when a model is given.

    Returns
    -------
    dict
        ``"result"`` (:class:`PPCResult`), ``"summary"`` (DataFrame), ``"figures"``
        (``{"statistics": plot_ppc, "calibration": plot_calibration}``), ``"text"``.
    """
    if isinstance(model_or_result, PPCResult):
        result = model_or_result
    else:
        result = ppc(model_or_result, n_replicates=n_replicates, seed=seed)
    s = result.summary
    parts = [
        f"{name.replace('_', ' ')}: {100 * row['fraction_central_95']:.0f}% of genes inside the "
        f"replicates' central 95%, replicate/observed median ratio {row['median_ratio']:.2f} "
        f"(corr. across genes {row['gene_correlation']:.2f})"
        for name, row in s.iterrows()
    ]
    n_rep = next(iter(result.replicates.values())).shape[0]
    text = (
        f"Posterior-predictive check (observed statistic among {n_rep} replicated datasets; "
        f"a calibrated model puts {100 * expected_coverage(n_rep):.1f}% of genes inside the "
        f"central 95% with {n_rep} replicates): " + "; ".join(parts) + "."
    )
    return {
        "result": result,
        "summary": s,
        "figures": {"statistics": plot_ppc(result), "calibration": plot_calibration(result)},
        "text": text,
    }
