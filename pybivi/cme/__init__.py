"""Chemical master equation numerics: exact steady-state solvers and approximators."""

from pybivi.cme.approximator import load_approximator as load_approximator
from pybivi.cme.approximator import load_default_approximator as load_default_approximator
from pybivi.cme.bivi import load_bivi_approximator as load_bivi_approximator
from pybivi.cme.exact import KNOWN_SCHEMES as KNOWN_SCHEMES
from pybivi.cme.exact import analytic_moments as analytic_moments
from pybivi.cme.exact import exact_pmf as exact_pmf
from pybivi.cme.exact import exact_pmf_many as exact_pmf_many
from pybivi.cme.exact import suggest_grid as suggest_grid
from pybivi.cme.training import train_approximator as train_approximator
from pybivi.cme.training_cli import main as approximator_main  # noqa: F401
