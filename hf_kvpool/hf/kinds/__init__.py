"""Cache-layer kinds as plug-ins: one module per family, registered on import (``base.py``)."""

import importlib
import pkgutil

from .base import LayerKind, kind_of, kinds_of, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["LayerKind", "kind_of", "kinds_of", "register"]
