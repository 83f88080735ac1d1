"""Optional dependencies, imported when first used, with an error that names the extra to install
(SkyPilot's ``LazyImport`` is the model). The design host installs ``duet[architect]`` without
torch; a module that can use torch when present asks for it here, not with a bare ``import``.

    torch = lazy("torch", extra="executor")      # nothing is imported yet
    torch.cuda.is_available()                    # imported now, or MissingExtra

The extras (pyproject.toml): ``architect`` (ray, psycopg, pymongo), ``executor`` (the training
stack), ``embedded`` (local PostgreSQL and Mongo-wire servers), ``search`` (the MiniLM embedder).
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which extra brings it."""


def require(module: str, extra: str, why: str = "") -> ModuleType:
    """The module, imported now; MissingExtra naming ``pip install 'duet[EXTRA]'`` when it is absent."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise MissingExtra(f"{top} is not installed{': ' + why if why else ''}: pip install 'duet[{extra}]'",
                           name=exc.name or top) from exc


class LazyModule:
    """A module that is imported on first attribute access (see ``require``)."""

    def __init__(self, module: str, extra: str, why: str = ""):
        self._spec = (module, extra, why)
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):  # copy/pickle/inspect probing: never an import
            raise AttributeError(attr)
        if self._module is None:
            self._module = require(*self._spec)
        return getattr(self._module, attr)


def lazy(module: str, extra: str, why: str = "") -> LazyModule:
    return LazyModule(module, extra, why)
