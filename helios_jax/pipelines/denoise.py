"""The jitted denoising of one chunk stage: the hot loop of every Helios pipeline.

:func:`run_stage` takes the noisy latent of one stage (pyramid stage, or the single stage of the plain pipeline),
optionally upsamples and re-noises it (pyramid stages >= 1), and runs all of that stage's scheduler steps inside one
``lax.fori_loop``: transformer forward (conditional and, with CFG, unconditional in one batch), guidance, scheduler
step. It is compiled once per (stage shape, step count, flags) and reused for every chunk.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from helios_jax.parallel.mesh import constrain_batch
from helios_jax.pipelines.history import place_block_noise, upsample_nearest_2x
from helios_jax.schedulers.dmd import dmd_step
from helios_jax.schedulers.helios import StepTables, helios_step, init_solver_state


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """Static description of one stage call (hashable; part of the jit cache key)."""

  scheduler_kind: str  # "unipc" | "euler" | "dmd"
  upsample: bool  # pyramid stage >= 1: nearest x2, then alpha * x + beta * block noise
  do_cfg: bool
  cfg_zero_star: bool
  zero_init: bool  # CFG-Zero* zero-init active in this stage (stage 0 and use_zero_init)
  zero_steps: int
  integer_timesteps: bool  # pyramid pipelines feed int64-truncated timesteps; the plain one floats
  report_steps: bool = False  # call the step listener after every step (a host callback: a program of its own)


_step_listener: Callable[[int, int], None] | None = None


def set_step_listener(listener: Callable[[int, int], None] | None) -> None:
  """``listener(step, num_steps)`` hears every finished denoising step of stages compiled with ``report_steps``
  (from XLA's callback thread; one listener per process). None removes it."""
  global _step_listener
  _step_listener = listener


def _step_done(step, num_steps) -> None:
  listener = _step_listener
  if listener is not None:
    listener(int(step), int(num_steps))


def _guide(spec: StageSpec, v_c: jax.Array, v_u: jax.Array, guidance: jax.Array, step: jax.Array) -> jax.Array:
  """Classifier-free guidance in the model dtype (the reference's arithmetic), with CFG-Zero* when enabled.

  Args:
    v_c, v_u: (B, C, T, h, w) conditional / unconditional velocities.
  """
  g = guidance.astype(v_c.dtype)
  if not spec.cfg_zero_star:
    return v_u + g * (v_c - v_u)
  b = v_c.shape[0]
  pos = v_c.reshape(b, -1).astype(jnp.float32)
  neg = v_u.reshape(b, -1).astype(jnp.float32)
  scale = jnp.sum(pos * neg, axis=1) / (jnp.sum(neg * neg, axis=1) + 1e-8)
  scale = scale.astype(v_c.dtype).reshape((b,) + (1,) * (v_c.ndim - 1))
  guided = v_u * scale + g * (v_c - v_u * scale)
  if spec.zero_init:
    # Steps 0..zero_steps (inclusive) of stage 0 predict zero velocity: x0 = the current sample.
    guided = jnp.where(step <= spec.zero_steps, v_c * 0.0, guided)
  return guided


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"))
def run_stage(graphdef, params, spec: StageSpec, x: jax.Array, tables: StepTables, history: dict, indices: dict,
              prompt_embeds: jax.Array, negative_prompt_embeds: jax.Array | None, guidance: jax.Array,
              block_noise: jax.Array | None = None, renoise: jax.Array | None = None) -> jax.Array:
  """Denoises one stage of one chunk.

  Args:
    graphdef, params: ``nnx.split(transformer)``; ``params`` may be ``(state, layer_states)`` (per-layer block
      weights, ``HeliosPipelineBase.unstack_transformer_layers``).
    x: (B, C, T, h, w) latent the stage starts from (before the upsample when ``spec.upsample``).
    tables: the stage's ``SchedulerTables.to_jax()``.
    history: ``latents_history_{short,mid,long}`` at full latent resolution.
    indices: the transformer's four ``indices_*`` arrays.
    prompt_embeds, negative_prompt_embeds: (B, S, text_dim).
    guidance: scalar guidance scale.
    block_noise: (B*C*T*h*w/4... , 4) i.i.d. normal draws for the re-noise (``spec.upsample`` only).
    renoise: (alpha, beta, L (4, 4) flattened) as a (18,) float32 vector (``spec.upsample`` only).
  Returns:
    (B, C, T, h', w') the stage's result (h' = 2h when upsampled).
  """
  params, layer_states = params if isinstance(params, tuple) else (params, None)
  tdt = nnx.merge(graphdef, params).config.param_dtype
  if spec.upsample:
    x = upsample_nearest_2x(x)
    alpha, beta, lower = renoise[0], renoise[1], renoise[2:].reshape(4, 4)
    noise = place_block_noise(block_noise, lower, x.shape).astype(tdt)
    x = alpha.astype(x.dtype) * x + beta.astype(noise.dtype) * noise
  noisy_start = x
  history = {k: v.astype(tdt) for k, v in history.items()}
  b = x.shape[0]
  pair = negative_prompt_embeds is not None and negative_prompt_embeds.shape == prompt_embeds.shape

  def velocity(xk, t):
    # Merge inside the loop body: NNX modules must not cross trace levels (fori_loop traces the body anew).
    model = nnx.merge(graphdef, params)
    xin = xk.astype(tdt)
    if not spec.do_cfg:
      return model.forward(xin, t, prompt_embeds, **indices, **history, layer_states=layer_states)
    if pair:  # one doubled batch for the conditional and unconditional passes
      # Under a mesh with data > 1 (CFG-parallel), the two halves run on different devices.
      cat = lambda a, b: constrain_batch(jnp.concatenate([a, b]))
      both = model.forward(cat(xin, xin), cat(t, t), cat(prompt_embeds, negative_prompt_embeds), **indices,
                           **{k: cat(v, v) for k, v in history.items()}, layer_states=layer_states)
      return both[:b], both[b:]
    return (model.forward(xin, t, prompt_embeds, **indices, **history, layer_states=layer_states),
            model.forward(xin, t, negative_prompt_embeds, **indices, **history, layer_states=layer_states))

  def body(k, carry):
    xk, state = carry
    if spec.integer_timesteps:
      t = jnp.broadcast_to(tables.model_timesteps[k], (b,))
    else:
      t = jnp.broadcast_to(tables.timesteps[k], (b,))
    v = velocity(xk, t)
    if spec.do_cfg:
      v = _guide(spec, v[0], v[1], guidance, k)
    if spec.scheduler_kind == "dmd":
      x_next = dmd_step(v, tables.model_timesteps[k], xk, k, noisy_start, tables)
    else:
      x_next, state = helios_step(state, v, xk, tables, k)
    if spec.report_steps:
      jax.debug.callback(_step_done, k, tables.num_steps, ordered=False)
    return x_next.astype(xk.dtype), state

  state = init_solver_state(x, model_dtype=tdt)
  x, _ = jax.lax.fori_loop(0, tables.num_steps, body, (x, state))
  if spec.scheduler_kind in ("dmd", "euler"):
    # The reference's last DMD step returns x0 in the model dtype (Euler: every step); later stages run in it.
    x = x.astype(tdt)
  return x
