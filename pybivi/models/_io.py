"""Saving and loading fitted models: a directory with the settings, weights and history.

``config.json`` holds the model class, its constructor arguments, the module class by import
path (so a user's subclass of :class:`~pybivi.module.ContrastiveModule` is rebuilt), the
registry and the training split; ``module.pt`` the weights; ``history.csv`` the history.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch

from pybivi import data as _data
from pybivi import registry as _registry
from pybivi.module import ContrastiveModule

__all__ = ["SaveLoadMixin", "class_path", "import_class", "check_module_cls"]

_CONFIG = "config.json"
_WEIGHTS = "module.pt"
_HISTORY = "history.csv"


def class_path(cls: type) -> str:
    """Import path ``"package.module:QualName"`` of a class, as stored by ``save``."""
    return f"{cls.__module__}:{cls.__qualname__}"


def import_class(path: str) -> type:
    """The class at ``"package.module:QualName"`` (the inverse of :func:`class_path`).

    Raises
    ------
    ImportError
        The module cannot be imported or has no such attribute.
    """
    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname or "<locals>" in qualname:
        raise ImportError(
            f"the module class {path!r} cannot be imported: define it at the top level of "
            "an importable module, or pass module_cls= to load()"
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ImportError(
            f"the saved module class {path!r} cannot be imported ({err}); make it importable "
            "(e.g. install or add to sys.path the package that defines it) or pass "
            "module_cls= to load()"
        ) from err
    return obj


def check_module_cls(module_cls: Any) -> type[ContrastiveModule]:
    """``module_cls`` itself, after checking that it builds a :class:`ContrastiveModule`."""
    if not (isinstance(module_cls, type) and issubclass(module_cls, ContrastiveModule)):
        raise TypeError(
            "module_cls must be pybivi.module.ContrastiveModule or a subclass of it, got "
            f"{module_cls!r}"
        )
    return module_cls


_Model = TypeVar("_Model", bound="SaveLoadMixin")


class SaveLoadMixin:
    """:meth:`save` and :meth:`load` of the model classes."""

    # ------------------------------------------------------------- save/load
    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write the weights, registry, settings and history to directory ``path``.

        The module's class is stored by its import path (``"package.module:QualName"``)
        together with the ``module_kwargs`` it was built with, so that :meth:`load`
        rebuilds a user's subclass of :class:`~pybivi.module.ContrastiveModule`.

        Raises
        ------
        FileExistsError
            ``path`` is a non-empty directory and ``overwrite`` is false.
        ValueError
            ``module_kwargs`` holds values that cannot be written as JSON.
        """
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True")
        kwargs = dict(self._init_kwargs)
        if kwargs.get("scheme") is not None and not isinstance(kwargs["scheme"], str):
            kwargs["scheme"] = kwargs["scheme"].name  # user schemes are re-found by name
        config = {
            "class": type(self).__name__,
            "init_kwargs": kwargs,
            "module_cls": class_path(type(self.module)),
            "module_kwargs": self._module_kwargs,
            "registry": self.registry.to_dict(),
            "is_trained": self.is_trained,
            "split": None
            if self.train_indices is None
            else {
                "train": [int(i) for i in self.train_indices],
                "validation": [int(i) for i in self.validation_indices],
            },
        }
        try:
            text = json.dumps(config, indent=1)
        except TypeError as err:
            raise ValueError(
                f"cannot save: the module arguments must be JSON numbers, strings, lists or "
                f"dictionaries ({err})"
            ) from None
        path.mkdir(parents=True, exist_ok=True)
        (path / _CONFIG).write_text(text)
        torch.save({k: v.cpu() for k, v in self.module.state_dict().items()}, path / _WEIGHTS)
        self.history.to_csv(path / _HISTORY, index=False)

    @classmethod
    def load(
        cls: type[_Model],
        path: str | Path,
        adata: Any,
        device: str | torch.device = "cpu",
        scheme: Any = None,
        module_cls: type[ContrastiveModule] | None = None,
    ) -> _Model:
        """Load a model written by :meth:`save`, bound to ``adata`` (same genes required).

        Parameters
        ----------
        path
            Directory written by :meth:`save`.
        adata
            Cells to bind the model to; it must have the saved genes, in order.
        device
            Where to put the module.
        scheme
            Reaction-scheme object to use instead of the saved name (a user scheme that
            is not registered, or a bursty scheme with another backend).
        module_cls
            Module class to build instead of the saved one (by default the class whose
            import path :meth:`save` stored is imported).

        Raises
        ------
        ValueError
            ``adata`` has different genes, or the directory holds another model class.
        ImportError
            The saved module class cannot be imported (and no ``module_cls`` is given).
        """
        path = Path(path)
        if not (path / _CONFIG).exists():
            raise FileNotFoundError(f"no saved pybivi model in {path} ({_CONFIG} missing)")
        config = json.loads((path / _CONFIG).read_text())
        if config["class"] != cls.__name__:
            raise ValueError(f"{path} holds a {config['class']}, not a {cls.__name__}")
        registry = _registry.Registry.from_dict(config["registry"])
        registry.check_genes(adata)
        model = cls.__new__(cls)
        kwargs = dict(config["init_kwargs"])
        seed = kwargs.pop("seed", 0)
        if scheme is not None:
            kwargs["scheme"] = scheme
        if module_cls is None:
            module_cls = import_class(config.get("module_cls", class_path(ContrastiveModule)))
        model._init_kwargs = {**kwargs, "seed": seed}
        model._module_cls = check_module_cls(module_cls)
        model._module_kwargs = dict(config.get("module_kwargs") or {})
        model.registry, model.adata = registry, adata
        model._cells = _data.CellData(adata, registry, check=True)
        model.module = model._make_module(kwargs)
        state = torch.load(path / _WEIGHTS, map_location="cpu", weights_only=True)
        model.module.load_state_dict(state)
        model.module.eval()
        model.history = pd.read_csv(path / _HISTORY)
        model.is_trained = bool(config["is_trained"])
        split = config.get("split")
        model.train_indices = None if not split else np.asarray(split["train"], dtype=np.int64)
        model.validation_indices = (
            None if not split else np.asarray(split["validation"], dtype=np.int64)
        )
        model.device = torch.device("cpu")
        model.training_diagnostics = None
        return model.to(device)
