"""UniPC (bh1 / bh2, predict-x0, flow prediction): host coefficients (:func:`unipc_coefficients`) and the
traceable step (:func:`unipc_step`)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.schedulers.solver_state import SolverState, flow_to_x0, step_index_or_state
from helios_jax.schedulers.tables import StepTables

# Lower clamp of the sigma that enters log() in UniPC's lambda (use_flow_sigmas).
_SIGMA_FLOOR = 1e-8


def _alpha_sigma(sig: np.ndarray, use_flow_sigmas: bool) -> tuple[np.ndarray, np.ndarray]:
  if use_flow_sigmas:
    return 1.0 - sig, np.maximum(sig, sig.dtype.type(_SIGMA_FLOOR))
  alpha = 1.0 / np.sqrt(sig ** 2 + 1.0)
  return alpha, sig * alpha


def _log(x: np.ndarray) -> np.ndarray:
  """log in the dtype of ``x``, evaluated in float64 and rounded once.

  Only matters for float32 input (the reference's float32-only stages == 1 path): torch's float32 log is within
  an ulp of this but not always equal, and lambda differences cancel, so that path agrees to ~2e-5 only.
  """
  x = np.asarray(x)
  return np.log(x.astype(np.float64)).astype(x.dtype)


def _expm1(x: Any) -> Any:
  """expm1 in the dtype of ``x``, evaluated in float64 and rounded once (see :func:`_log`)."""
  x = np.asarray(x)
  return np.expm1(x.astype(np.float64)).astype(x.dtype)


def unipc_coefficients(sigmas: np.ndarray, solver_type: str = "bh2", solver_order: int = 2,
                       lower_order_final: bool = True, disable_corrector: Sequence[int] = (),
                       use_flow_sigmas: bool = True, dtype: Any = np.float64) -> dict[str, np.ndarray]:
  """Per-step scalars of UniPC (predict-x0, B(h) = h for bh1, expm1(h) for bh2), in ``dtype``.

  ``dtype`` is the dtype of the reference's sigma tensor, in which it does all of this scalar arithmetic: float64
  for every pipeline schedule, float32 on the stages == 1 path without custom sigmas.

  For step k (n steps, sigmas of shape (n + 1,)) with lambda(s) = log(alpha_s) - log(sigma_s):

  * predictor k -> k+1: ``x_{k+1} = pred_ratio*x - pred_m*x0_k - pred_b * 0.5 * (x0_{k-1} - x0_k) / pred_rk``
    (the last term only at order 2);
  * corrector k-1 -> k (k >= 1): ``x_k = corr_ratio*x_{k-1} - corr_m*x0_{k-1} - corr_b * R`` with
    ``R = 0.5 * (x0_k - x0_{k-1})`` at order 1 and
    ``R = corr_rho_a * (x0_{k-2} - x0_{k-1}) / corr_rk + corr_rho_b * (x0_k - x0_{k-1})`` at order 2;
  * ``max_order[k]``: order cap from lower_order_final; ``corr_enabled[k]``: k >= 1 and k-1 not disabled.

  Entries that a step never reads are filled with harmless finite values (0, or 1 for the divisors).
  """
  dtype = np.dtype(dtype)
  sig = np.asarray(sigmas).astype(dtype)
  n = sig.shape[0] - 1
  alpha, sig_c = _alpha_sigma(sig, use_flow_sigmas)
  with np.errstate(divide="ignore"):
    lam = _log(alpha) - _log(sig_c)

  def segment(s: int, t: int):
    """(ratio, m, b, hh, phi1, B) of the exponential-integrator step from index s to t."""
    h = lam[t] - lam[s]
    hh = -h
    phi1 = _expm1(hh)
    b_h = hh if solver_type == "bh1" else _expm1(hh)
    return sig_c[t] / sig_c[s], alpha[t] * phi1, alpha[t] * b_h, h, hh, phi1, b_h

  out = {name: np.zeros(n, dtype) for name in ("pred_ratio", "pred_m", "pred_b", "corr_ratio", "corr_m",
                                               "corr_b", "corr_rho_a", "corr_rho_b")}
  out["pred_rk"] = np.ones(n, dtype)
  out["corr_rk"] = np.ones(n, dtype)
  for k in range(n):
    ratio, m, b, h, _, _, _ = segment(k, k + 1)
    out["pred_ratio"][k], out["pred_m"][k], out["pred_b"][k] = ratio, m, b
    if k >= 1:
      out["pred_rk"][k] = (lam[k - 1] - lam[k]) / h
      ratio, m, b, h, hh, phi1, b_h = segment(k - 1, k)
      out["corr_ratio"][k], out["corr_m"][k], out["corr_b"][k] = ratio, m, b
    if k >= 2:
      rk = (lam[k - 2] - lam[k - 1]) / h
      g1 = phi1 / hh - 1
      g2 = g1 / hh - 0.5
      rhs = np.array([g1 * 1 / b_h, g2 * 2 / b_h], dtype)
      rho = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]], dtype), rhs)
      out["corr_rk"][k], out["corr_rho_a"][k], out["corr_rho_b"][k] = rk, rho[0], rho[1]
  steps = np.arange(n)
  if lower_order_final:
    out["max_order"] = np.minimum(solver_order, n - steps).astype(np.int64)
  else:
    out["max_order"] = np.full(n, solver_order, np.int64)
  disabled = set(int(d) for d in disable_corrector)
  out["corr_enabled"] = np.array([k >= 1 and (k - 1) not in disabled for k in range(n)], bool)
  return out


def unipc_step(state: SolverState, model_output: jax.Array, sample: jax.Array, tables: StepTables,
               step_index: Any = None) -> tuple[jax.Array, SolverState]:
  """One UniPC predictor-corrector step (flow prediction, predict-x0), traceable.

  Args:
    state: from :func:`init_solver_state` or the previous call.
    model_output: (*shape) velocity v_k predicted at ``sample`` (any float dtype; bf16 in the pipelines).
    sample: (*shape) x_k (float32 in the pipelines).
    tables: ``set_timesteps(...).to_jax()`` of kind "unipc".
    step_index: k, a Python int or (traced) int32 scalar; defaults to ``state.step_index``.
  Returns:
    ``(x_{k+1}, new_state)``; x_{k+1} has ``sample.dtype``.

  Precision: every scalar coefficient was computed on the host in float64 and rounded once to float32, which is
  exactly what the reference does when it multiplies a 0-dim float64 tensor into a float32 tensor; the tensor
  arithmetic (differences, the D1 divisions, the einsum-like sums) runs in float32 in the reference's order.
  Both corrector orders and both predictor orders are evaluated and selected with ``jnp.where``.
  """
  k = step_index_or_state(step_index, state)
  c = tables.coef
  f32 = jnp.float32
  x0 = flow_to_x0(model_output, sample, tables.sigmas[k])
  x0_f = x0.astype(f32)
  m0 = state.x0_last.astype(f32)       # x0_{k-1}
  m1 = state.x0_prev.astype(f32)       # x0_{k-2}
  last = state.last_sample.astype(f32)

  # Corrector from k-1 to k (order = the previous predictor's order).
  base = c["corr_ratio"][k] * last - c["corr_m"][k] * m0
  d1_t = x0_f - m0
  corr1 = base - c["corr_b"][k] * (0.5 * d1_t)
  d1 = (m1 - m0) / c["corr_rk"][k]
  corr2 = base - c["corr_b"][k] * (c["corr_rho_a"][k] * d1 + c["corr_rho_b"][k] * d1_t)
  corrected = jnp.where(state.this_order >= 2, corr2, corr1).astype(sample.dtype)
  use_corrector = c["corr_enabled"][k] & (state.lower_order_nums > 0)
  x_c = jnp.where(use_corrector, corrected, sample)

  # Predictor from k to k+1 (warm-up: order <= steps taken + 1; lower_order_final via max_order).
  order = jnp.minimum(c["max_order"][k], state.lower_order_nums + 1).astype(jnp.int32)
  xc_f = x_c.astype(f32)
  pred1 = c["pred_ratio"][k] * xc_f - c["pred_m"][k] * x0_f
  d1_p = (m0 - x0_f) / c["pred_rk"][k]
  pred2 = pred1 - c["pred_b"][k] * (0.5 * d1_p)
  prev = jnp.where(order >= 2, pred2, pred1).astype(sample.dtype)

  new_state = SolverState(
      x0_last=x0.astype(state.x0_last.dtype), x0_prev=state.x0_last, last_sample=x_c.astype(state.last_sample.dtype),
      this_order=order, lower_order_nums=jnp.minimum(state.lower_order_nums + 1, 2).astype(jnp.int32),
      step_index=(k + 1).astype(jnp.int32))
  return prev, new_state
