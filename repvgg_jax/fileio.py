"""Atomic file writes: a kill or an error never leaves half a file at ``path``."""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
  """``write(tmp)`` to a temporary file beside ``path`` (same extension, so
  writers that pick a format by name still work), fsync, then rename over ``path``."""
  path = os.fspath(path)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                             suffix=".tmp" + os.path.splitext(path)[1])
  os.close(fd)
  try:
    write(tmp)
    # mkstemp makes the file 0600; give it the mode an ordinary open() would (0644 at umask 022).
    os.chmod(tmp, 0o666 & ~_umask())
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """:func:`atomic_write` of ``data``."""
  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:
      f.write(data)
  atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """:func:`atomic_write` of ``text``."""
  atomic_write_bytes(path, text.encode())
