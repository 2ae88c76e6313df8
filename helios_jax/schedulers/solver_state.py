"""The carry of the UniPC / Euler steps (:class:`SolverState`) and the flow-to-x0 conversion both read."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class SolverState(NamedTuple):
  """UniPC / Euler solver state (a pytree; use it as a ``fori_loop`` / ``scan`` carry).

  Attributes:
    x0_last: (*sample.shape) newest converted output x0_{k-1} (the FIFO's newest slot).
    x0_prev: (*sample.shape) the one before, x0_{k-2}.
    last_sample: (*sample.shape) the (corrected) sample the last predictor started from.
    this_order: int32 scalar, the order the last predictor used (the next corrector reuses it).
    lower_order_nums: int32 scalar, steps taken so far, capped at 2 (0 means "no history yet").
    step_index: int32 scalar, index of the next step.
  """

  x0_last: jax.Array
  x0_prev: jax.Array
  last_sample: jax.Array
  this_order: jax.Array
  lower_order_nums: jax.Array
  step_index: jax.Array


def init_solver_state(sample: jax.Array, model_dtype: Any = None) -> SolverState:
  """Fresh state (what ``set_timesteps`` resets in the reference).

  Args:
    sample: (B, C, T, H, W) (any shape) the latent the schedule starts from.
    model_dtype: dtype of the model outputs; the x0 history uses the promotion of it with ``sample.dtype``
      (float32 for the pipelines' float32 latents). Defaults to ``sample.dtype``.
  """
  sample = jnp.asarray(sample)
  x0_dtype = jnp.promote_types(sample.dtype, model_dtype if model_dtype is not None else sample.dtype)
  zeros = jnp.zeros(sample.shape, x0_dtype)
  zero = jnp.zeros((), jnp.int32)
  return SolverState(x0_last=zeros, x0_prev=zeros, last_sample=jnp.zeros_like(sample), this_order=zero,
                     lower_order_nums=zero, step_index=zero)


def flow_to_x0(model_output: jax.Array, sample: jax.Array, sigma: jax.Array) -> jax.Array:
  """x0 = sample - sigma * v with the reference's rounding.

  The reference multiplies a 0-dim float64 sigma tensor into the model output *in the model output's dtype* (a
  0-dim tensor does not promote): sigma itself is first rounded to that dtype (bf16 in the pipelines), the product
  is formed in float32 and rounded to that dtype again, then subtracted from the float32 sample. We do the same
  three roundings (verified against torch bit for bit). Result dtype: the promotion of the two input dtypes.
  """
  out_dtype = jnp.promote_types(sample.dtype, model_output.dtype)
  sigma = sigma.astype(model_output.dtype).astype(jnp.float32)
  prod = (sigma * model_output.astype(jnp.float32)).astype(model_output.dtype)
  return (sample.astype(jnp.float32) - prod.astype(jnp.float32)).astype(out_dtype)


def step_index_or_state(step_index: Any, state: SolverState | None) -> jax.Array:
  if step_index is None:
    return state.step_index
  return jnp.asarray(step_index, jnp.int32)
