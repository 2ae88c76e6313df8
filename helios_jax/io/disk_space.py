"""Recognising "disk full" failures and turning them into one :class:`~helios_jax.errors.DiskFullError`.

Writers in this package (checkpoints, metrics, prepared data) fail in different libraries (Python's ``OSError``,
tensorstore's ``ValueError``, tfds' wrapped errors), so :func:`is_disk_full` looks for ``ENOSPC`` / ``EDQUOT`` in the
exception chain and for the C library's message in the text. :func:`disk_full_error` builds the user-facing error:
which write, which path, and how much space is left there.
"""

from __future__ import annotations

import errno
import os
import shutil

from helios_jax.errors import DiskFullError

# errno values of "no space left" (ENOSPC) and "quota exceeded" (EDQUOT; not defined on every platform)
_FULL_ERRNOS = {errno.ENOSPC} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())
# strerror texts of those errno values, as libraries that do not raise OSError (tensorstore, absl) print them
_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "enospc")


def is_disk_full(exc: BaseException | None) -> bool:
  """True when ``exc`` or an exception it was raised from / during is a disk-full (or quota) failure."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, DiskFullError):
      return True
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
      return True
    if any(t in str(exc).lower() for t in _FULL_TEXTS):
      return True
    exc = exc.__cause__ or exc.__context__
  return False


def free_bytes(path: str) -> int | None:
  """Free bytes on the file system holding ``path`` (its nearest existing parent), or None if unknown."""
  p = os.path.abspath(path)
  while p and not os.path.exists(p):
    parent = os.path.dirname(p)
    if parent == p:
      break
    p = parent
  try:
    return shutil.disk_usage(p).free
  except OSError:
    return None


def format_bytes(n: int | None) -> str:
  if n is None:
    return "an unknown amount"
  for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n} bytes"  # not reached


def disk_full_error(what: str, path: str, exc: BaseException | None = None) -> DiskFullError:
  """The one-sentence error for a failed write of ``what`` (e.g. "checkpoint 40") to ``path``."""
  err = DiskFullError(f"disk full while writing {what} to {path}: {format_bytes(free_bytes(path))} free there "
                      "(free some space or choose another folder, then run the same command again)")
  err.errno = errno.ENOSPC
  return err
