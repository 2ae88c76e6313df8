"""Noise sources: every random draw of a pipeline goes through one ``noise_source(kind, shape) -> array``.

``kind`` is ``"normal"`` (standard normal) or ``"uniform"`` (on [0, 1)). The pipelines call it once per draw, with
the same shapes and in the same order as diffusers' pipelines draw from their torch generator (initial noise per
chunk, block noise per pyramid stage transition, image / video latent noise and their sigmas), so a recorded torch
draw sequence replays exactly through :class:`ReplayNoiseSource`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.errors import InputError

NoiseSource = Callable[[str, tuple], jax.Array]
KINDS = ("normal", "uniform")


class JaxNoiseSource:
  """The default: draws from ``jax.random`` (float32), one fresh key per draw, starting from ``seed``."""

  def __init__(self, seed: int = 0):
    self._key = jax.random.key(int(seed))

  def __call__(self, kind: str, shape: Sequence[int]) -> jax.Array:
    self._key, key = jax.random.split(self._key)
    if kind == "normal":
      return jax.random.normal(key, tuple(shape), jnp.float32)
    if kind == "uniform":
      return jax.random.uniform(key, tuple(shape), jnp.float32)
    raise InputError(f"unknown noise kind {kind!r}; expected one of {KINDS}")


class ReplayNoiseSource:
  """Returns recorded draws in order, checking that each request has the recorded kind and shape."""

  def __init__(self, draws: Iterable[tuple[str, np.ndarray]]):
    self._draws = list(draws)
    self.used = 0

  @classmethod
  def from_flat(cls, kinds: Sequence[str], shapes: Sequence[Sequence[int]], values: np.ndarray):
    """Rebuilds the draw list from kinds, shapes and all values concatenated (the fixtures' storage format)."""
    draws, offset = [], 0
    for kind, shape in zip(kinds, shapes):
      n = int(np.prod(shape))
      draws.append((str(kind), np.asarray(values[offset:offset + n], np.float32).reshape(shape)))
      offset += n
    if offset != len(values):
      raise InputError(f"recorded noise has {len(values) - offset} values left over")
    return cls(draws)

  @property
  def remaining(self) -> int:
    return len(self._draws) - self.used

  def __call__(self, kind: str, shape: Sequence[int]) -> jax.Array:
    if self.used >= len(self._draws):
      raise InputError(f"replayed noise exhausted after {self.used} draws (asked for {kind} {tuple(shape)})")
    rec_kind, value = self._draws[self.used]
    if rec_kind != kind or tuple(value.shape) != tuple(shape):
      raise InputError(f"draw {self.used}: pipeline asked for {kind} {tuple(shape)}, the recording has "
                       f"{rec_kind} {tuple(value.shape)}")
    self.used += 1
    return jnp.asarray(value)


def draw(noise_source: NoiseSource, kind: str, shape: Sequence[int]) -> jax.Array:
  """Calls ``noise_source`` and checks what a user-supplied callable returned (shape, float dtype)."""
  shape = tuple(int(s) for s in shape)
  value = jnp.asarray(noise_source(kind, shape))
  if value.shape != shape:
    raise InputError(f"noise_source returned shape {value.shape} for a {kind} draw of shape {shape}")
  if not jnp.issubdtype(value.dtype, jnp.floating):
    raise InputError(f"noise_source returned dtype {value.dtype}; expected floating point")
  return value.astype(jnp.float32)
