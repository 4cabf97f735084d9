"""Reaction schemes: the biophysics behind a bivariate (nascent, mature) count law.

Built in: ``"bursty"`` (:class:`BurstyScheme`, the likelihood of ContrastiveBiVI),
``"constitutive"`` (:class:`ConstitutiveScheme`) and ``"extrinsic"``
(:class:`ExtrinsicScheme`). Add your own by subclassing :class:`ReactionScheme` and
calling :func:`register`::

    import pybivi

    class MyScheme(pybivi.schemes.ReactionScheme):
        name = "my_scheme"
        ...

    pybivi.schemes.testing.check_scheme(MyScheme())   # raises if it is not a sound law
    pybivi.schemes.register(MyScheme())
    scheme = pybivi.schemes.get("my_scheme")
"""

from __future__ import annotations

from typing import Any

# ``pybivi.schemes.testing.check_scheme``: is a scheme a sound law?
from pybivi.schemes import testing as testing
from pybivi.schemes.base import ReactionScheme
from pybivi.schemes.bursty import BurstyScheme, ExactConditional, sample_bursty
from pybivi.schemes.constitutive import ConstitutiveScheme
from pybivi.schemes.extrinsic import ExtrinsicScheme

__all__ = [
    "ReactionScheme",
    "BurstyScheme",
    "ConstitutiveScheme",
    "ExtrinsicScheme",
    "ExactConditional",
    "sample_bursty",
    "get",
    "register",
    "available",
]

_REGISTRY: dict[str, ReactionScheme] = {}


def register(
    scheme: ReactionScheme | type[ReactionScheme], *, overwrite: bool = False
) -> ReactionScheme:
    """Add a reaction scheme to the registry under ``scheme.name``.

    Parameters
    ----------
    scheme
        A :class:`ReactionScheme` instance, or a subclass that can be built without
        arguments.
    overwrite
        Replace an existing scheme of the same name instead of raising.

    Returns
    -------
    ReactionScheme
        The registered instance (what :func:`get` returns for its name).
    """
    if isinstance(scheme, type) and issubclass(scheme, ReactionScheme):
        scheme = scheme()
    if not isinstance(scheme, ReactionScheme):
        raise TypeError(
            f"register() needs a ReactionScheme instance or subclass, got {type(scheme).__name__}"
        )
    name = scheme.name
    if not isinstance(name, str) or not name or name == ReactionScheme.name:
        raise ValueError(f"a reaction scheme needs a non-empty, specific `name`; got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(
            f"a reaction scheme named {name!r} is already registered; pass overwrite=True"
        )
    _REGISTRY[name] = scheme
    return scheme


def get(scheme: str | ReactionScheme, **kwargs: Any) -> ReactionScheme:
    """Look up a reaction scheme by name.

    Parameters
    ----------
    scheme
        A registered name (``"bursty"``, ``"constitutive"``, ``"extrinsic"`` or one
        added by :func:`register`), or a :class:`ReactionScheme` instance, returned as is.
    **kwargs
        Constructor options, e.g. ``get("bursty", backend="exact")``. With options a new
        instance of the registered scheme's class is built; without, the registered
        instance is returned.

    Returns
    -------
    ReactionScheme
    """
    if isinstance(scheme, ReactionScheme):
        if kwargs:
            raise ValueError(
                "options can only be given together with a scheme name, not an instance"
            )
        return scheme
    if not isinstance(scheme, str):
        raise TypeError(f"scheme must be a name or a ReactionScheme, got {type(scheme).__name__}")
    if scheme not in _REGISTRY:
        raise KeyError(f"unknown reaction scheme {scheme!r}; available: {', '.join(available())}")
    registered = _REGISTRY[scheme]
    if not kwargs:
        return registered
    try:
        return type(registered)(**kwargs)
    except TypeError as err:
        raise ValueError(f"invalid options for reaction scheme {scheme!r}: {err}") from None


def available() -> list[str]:
    """Names of the registered reaction schemes, sorted."""
    return sorted(_REGISTRY)


register(BurstyScheme())
register(ConstitutiveScheme())
register(ExtrinsicScheme())
