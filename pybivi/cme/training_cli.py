"""The command line of ``pybivi approximator train``: options from the training function.

Every option of :func:`pybivi.cme.training.train_approximator` becomes a flag with that
function's default and type, so the command line cannot drift from it;
``python -m pybivi.cme.training_cli`` (or ``python -m pybivi.cme.training``) runs it too.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Sequence

from pybivi.cme import training
from pybivi.cme.approximator import WEIGHTS_DIR
from pybivi.cme.moments import SLOPES

__all__ = ["main"]

# Help texts of the options that need more than their name; each option's default and type
# come from train_approximator's signature, so the command line cannot drift from it.
_OPTION_HELP = {
    "time_limit": "seconds of training",
    "pairs_per_batch": "(n, m) pairs per Adam step",
    "hard_power": "weight designs by (KL_d / mean KL)**power of the previous epoch (0: off; "
    "negative: favour typical designs over the hardest)",
    "hard_cap": "clip of the design weights",
    "n_large_rows": "nascent rows per b >= 1 design",
}
_OPTION_TYPE = {"time_limit": float, "n_large_rows": int}  # options whose default is None
_OPTION_FLAG = {"cache_dir": "--cache"}
_OPTION_CHOICES = {"activation": ("relu", "silu"), "moment_slope": SLOPES}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``pybivi approximator train`` (``python -m pybivi.cme.training_cli``)."""
    # The description is the training module's docstring, the method the options drive.
    ap = argparse.ArgumentParser(prog="pybivi approximator train", description=training.__doc__)
    ap.add_argument("--out", default=str(WEIGHTS_DIR), help="output folder (default: shipped)")
    params = inspect.signature(training.train_approximator).parameters
    names = [n for n in params if n not in ("out_dir", "log")]
    for name in names:
        default = params[name].default
        extra = {"choices": list(_OPTION_CHOICES[name])} if name in _OPTION_CHOICES else {}
        ap.add_argument(
            _OPTION_FLAG.get(name, "--" + name.replace("_", "-")),
            dest=name,
            type=_OPTION_TYPE.get(name, type(default)),
            default=default,
            help=_OPTION_HELP.get(name),
            **extra,
        )
    a = ap.parse_args(argv)
    options = {n: getattr(a, n) for n in names}
    path = training.train_approximator(a.out, **options, log=lambda s: print(s, flush=True))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
