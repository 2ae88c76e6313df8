"""User-facing error types.

Every mistake a user can make (a wrong path, a checkpoint that does not fit, a badly shaped input) is raised
as a subclass of :class:`HeliosError` with one sentence that names the problem. Command-line entry points catch
``HeliosError`` and print ``error: <message>`` instead of a traceback.
"""

from __future__ import annotations


class HeliosError(Exception):
  """Base class of every error that reports a user mistake rather than a bug."""


class CheckpointError(HeliosError):
  """A model folder or checkpoint file is missing, incomplete, or does not fit the config."""


class InputError(HeliosError, ValueError):
  """An argument passed to a model, scheduler or pipeline has the wrong shape, type or value."""


class DiskFullError(HeliosError, OSError):
  """A write failed because the disk (or quota) is full; the message names the path and the free space."""


class RuntimeSetupError(HeliosError, RuntimeError):
  """A process setting was asked for too late (e.g. XLA flags after JAX started its backends)."""
