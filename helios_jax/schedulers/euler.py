"""Flow-matching Euler: host coefficients (:func:`euler_coefficients`) and the traceable step (:func:`euler_step`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.schedulers.solver_state import SolverState, step_index_or_state
from helios_jax.schedulers.tables import StepTables


def euler_coefficients(sigmas: np.ndarray) -> dict[str, np.ndarray]:
  """``sigma_delta[k] = sigmas[k + 1] - sigmas[k]`` in float64, shape (n,)."""
  sig = np.asarray(sigmas, np.float64)
  return {"sigma_delta": sig[1:] - sig[:-1]}


def euler_step(state: SolverState, model_output: jax.Array, sample: jax.Array, tables: StepTables,
               step_index: Any = None) -> tuple[jax.Array, SolverState]:
  """One flow-matching Euler step ``x + (sigma_{k+1} - sigma_k) * v``, traceable.

  Returns ``(x_{k+1}, new_state)`` with x_{k+1} in ``model_output.dtype``, as the reference casts it. The
  reference forms (dsigma * v) in the model output's dtype (a 0-dim float64 tensor does not promote, so dsigma is
  rounded to that dtype, e.g. bf16, and so is the product) and adds it to the float32 sample; we round the same
  way. Inside a ``fori_loop`` with a float32 carry and bf16 model outputs, cast the result back to the carry dtype
  (the values are bf16-exact).
  """
  k = step_index_or_state(step_index, state)
  delta = tables.coef["sigma_delta"][k].astype(model_output.dtype).astype(jnp.float32)
  prod = (delta * model_output.astype(jnp.float32)).astype(model_output.dtype)
  prev = (sample.astype(jnp.float32) + prod.astype(jnp.float32)).astype(model_output.dtype)
  new_state = state._replace(step_index=(k + 1).astype(jnp.int32),
                             lower_order_nums=jnp.minimum(state.lower_order_nums + 1, 2).astype(jnp.int32))
  return prev, new_state
