"""Time-shift maps of the Helios schedulers (host side, numpy): the resolution-dependent mu and the
exponential / linear sigma maps. Shapes: 1-D sigma arrays in, same shape and dtype out."""

from __future__ import annotations

import math

import numpy as np

from helios_jax.errors import InputError

TIME_SHIFT_TYPES = ("exponential", "linear")


def calculate_shift(image_seq_len: float, base_seq_len: float = 256, max_seq_len: float = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
  """Resolution-dependent shift mu: a straight line through (base_seq_len, base_shift), (max_seq_len, max_shift).

  Args:
    image_seq_len: number of noisy tokens (T * h * w / 4 for the 1x2x2 patch).
  Returns:
    mu as a Python float.
  """
  slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  intercept = base_shift - slope * base_seq_len
  return image_seq_len * slope + intercept


def _shift_map(m: float, sigmas: np.ndarray, torch_order: bool) -> np.ndarray:
  """m / (m + 1/sigma - 1) elementwise in the dtype of ``sigmas``; sigma = 0 maps to 0.

  ``torch_order``: the reference applies the maps to torch tensors, where ``scalar / tensor`` is evaluated as
  ``reciprocal(tensor) * scalar`` (two roundings); on numpy arrays (its float32 stages == 1 grid) it is one
  division. Following the right order keeps our tables bit-identical.
  """
  sigmas = np.asarray(sigmas)
  with np.errstate(divide="ignore"):
    denom = m + (1.0 / sigmas - 1.0)
    return (1.0 / denom) * m if torch_order else m / denom


def time_shift_exponential(mu: float, sigmas: np.ndarray, torch_order: bool = True) -> np.ndarray:
  """sigma -> e^mu / (e^mu + 1/sigma - 1), elementwise, in the dtype of ``sigmas`` (sigma = 0 stays 0)."""
  return _shift_map(math.exp(mu), sigmas, torch_order)


def time_shift_linear(mu: float, sigmas: np.ndarray, torch_order: bool = True) -> np.ndarray:
  """sigma -> mu / (mu + 1/sigma - 1), elementwise, in the dtype of ``sigmas`` (sigma = 0 stays 0)."""
  return _shift_map(mu, sigmas, torch_order)


def time_shift(time_shift_type: str, mu: float, sigmas: np.ndarray, torch_order: bool = True) -> np.ndarray:
  """Applies the ``exponential`` or ``linear`` shift map to a 1-D sigma array (host, dtype preserved)."""
  if time_shift_type == "exponential":
    return time_shift_exponential(mu, sigmas, torch_order)
  if time_shift_type == "linear":
    return time_shift_linear(mu, sigmas, torch_order)
  raise InputError(f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got {time_shift_type!r}")
