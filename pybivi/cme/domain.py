"""Domain of the bursty conditional approximator (kept import-light: no scipy, no torch).

Parameters are in units of the burst frequency ``k``. A parameter set is *inside the
domain* when its ``(log10 b, log10 beta, log10 gamma)`` lies in :data:`BOX` and, for
both species, the ``1 - TAIL_MASS`` quantile of a negative binomial moment-matched to
the marginal lies below :data:`STATE_CAP` (so an exact solution on a
``STATE_CAP x STATE_CAP`` grid holds all but about ``1e-10`` of the mass).
"""

BOX = {"log10_b": (-3.0, 3.0), "log10_beta": (-2.0, 2.0), "log10_gamma": (-3.0, 2.0)}
"""Training box in log10 units (rates relative to the burst frequency)."""

STATE_CAP = 2048
"""Largest ``1 - TAIL_MASS`` marginal quantile (per species) of a parameter set in the domain."""

TAIL_MASS = 1e-10
"""Mass a scored grid may leave out."""
