"""Old public names, kept for one release: each still works, warns (``DeprecationWarning``)
and names its replacement. A package lists them in ``__getattr__ = renamed(...)``."""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable


def warn_renamed(old: str, new: str) -> None:
  """The one warning of an old name: ``old`` goes in the next release, use ``new``
  (attributed to the caller's caller)."""
  warnings.warn(f"{old} is deprecated and goes in the next release: use {new}",
                DeprecationWarning, stacklevel=3)


def renamed(module: str, names: dict[str, str]) -> Callable[[str], Any]:
  """A module ``__getattr__`` (PEP 562) for ``names``: old name -> ``"pkg.module.new"``,
  the new object's full path (imported on first use)."""
  def __getattr__(name: str) -> Any:
    if name not in names:
      raise AttributeError(f"module {module!r} has no attribute {name!r}")
    where, _, new = names[name].rpartition(".")
    warn_renamed(f"{module}.{name}", names[name])
    return getattr(importlib.import_module(where), new)
  return __getattr__
