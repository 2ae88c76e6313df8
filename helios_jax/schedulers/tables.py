"""Per-schedule tables: :class:`SchedulerTables` (host, float64, what ``set_timesteps`` returns) and its device
copy :class:`StepTables` (a float32 / int32 pytree the traceable steps read)."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class StepTables:
  """Device copy of a :class:`SchedulerTables`: a pytree of float32/int32/bool jnp arrays (pass it into jit).

  Attributes:
    sigmas: (n + 1,) float32.
    timesteps: (n,) float32.
    model_timesteps: (n,) int32, timesteps truncated toward zero on the host (what the pyramid pipelines feed
      the transformer).
    coef: per-step solver coefficients, each (n,) (names depend on ``kind``).
    kind: "unipc" | "euler" | "dmd" (static).
  """

  sigmas: jax.Array
  timesteps: jax.Array
  model_timesteps: jax.Array
  coef: dict[str, jax.Array]
  kind: str = struct.field(pytree_node=False, default="unipc")

  @property
  def num_steps(self) -> int:
    return self.timesteps.shape[0]


@dataclasses.dataclass(frozen=True, eq=False)
class SchedulerTables:
  """Host result of ``set_timesteps``: one schedule plus its precomputed per-step solver coefficients.

  Attributes:
    kind: "unipc" | "euler" | "dmd".
    timesteps: (n,) float64, one per model call (the reference's ``scheduler.timesteps``).
    sigmas: (n + 1,) float64, ending with 0 (the reference's ``scheduler.sigmas``).
    stage_index: the pyramid stage, or None.
    mu: the dynamic-shift parameter used, or None.
    coef: name -> (n,) numpy array (float64 coefficients, bool/int flags).
  """

  kind: str
  timesteps: np.ndarray
  sigmas: np.ndarray
  stage_index: int | None
  mu: float | None
  coef: Mapping[str, np.ndarray]

  @property
  def num_steps(self) -> int:
    return int(self.timesteps.shape[0])

  @property
  def model_timesteps(self) -> np.ndarray:
    """(n,) int64: timesteps truncated toward zero, as ``t.to(torch.int64)`` does in the pyramid pipelines."""
    return np.trunc(self.timesteps).astype(np.int64)

  def to_jax(self) -> StepTables:
    """float32 / int32 / bool device copies (float64 values are rounded once, on the host)."""
    def dev(a: np.ndarray) -> jax.Array:
      a = np.asarray(a)
      if a.dtype.kind == "f":
        a = a.astype(np.float32)
      elif a.dtype.kind in "iu":
        a = a.astype(np.int32)
      return jnp.asarray(a)
    return StepTables(sigmas=dev(self.sigmas), timesteps=dev(self.timesteps),
                      model_timesteps=dev(self.model_timesteps), coef={k: dev(v) for k, v in self.coef.items()},
                      kind=self.kind)
