"""Old public names, kept for one release: each still works, warns (``DeprecationWarning``)
and names its replacement. A package lists them in ``__getattr__ = renamed(...)``."""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable


def renamed(module: str, names: dict[str, str]) -> Callable[[str], Any]:
  """A module ``__getattr__`` (PEP 562) for ``names``: old name -> ``"pkg.module.new"``,
  the new object's full path (imported on first use)."""
  def __getattr__(name: str) -> Any:
    if name not in names:
      raise AttributeError(f"module {module!r} has no attribute {name!r}")
    where, _, new = names[name].rpartition(".")
    warnings.warn(f"{module}.{name} is deprecated and goes in the next release: use "
                  f"{names[name]}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(where), new)
  return __getattr__
