"""The compiled extension ``edgeprune_fast._C``, loaded in one place.

``load()`` imports it once and returns the module, or None; a failure is recorded, never
raised, and ``load_error()`` says why and how to fix it (not built, or built against
another torch). Callers: the ``cpp`` backend (ops/backends/cpp.py) and ``info``.
"""

from __future__ import annotations

import importlib

import torch

_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (or `make setup`) in the repository"
_module = None
_error: str | None = None
_tried = False


def load():
    """The ``edgeprune_fast._C`` module, or None if it is not built or cannot be loaded."""
    global _module, _error, _tried
    if not _tried:
        _tried = True
        try:
            module = importlib.import_module("edgeprune_fast._C")
        except ModuleNotFoundError as exc:
            _error = f"edgeprune_fast._C is not built ({exc}); {_BUILD_HINT}"
        except Exception as exc:  # e.g. undefined symbols after a torch upgrade
            _error = f"edgeprune_fast._C failed to load ({type(exc).__name__}: {exc}); rebuild: {_BUILD_HINT}"
        else:
            built_with = getattr(module, "built_with_torch", "unknown")
            if built_with.split("+")[0] != torch.__version__.split("+")[0]:
                _error = (f"edgeprune_fast._C was built against torch {built_with}, this is torch "
                          f"{torch.__version__}; rebuild: {_BUILD_HINT}")
            else:
                _module = module
    return _module


def load_error() -> str | None:
    """Why ``load()`` returned None (None when the extension is loaded)."""
    load()
    return _error
