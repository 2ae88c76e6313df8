"""Model construction, trainable partition and the jitted train step shared by stage 1 (base) and stage 2 (mid)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from helios_jax.errors import InputError
from helios_jax.models.transformer import HeliosTransformer3DModel, HeliosTransformerConfig
from helios_jax.training import losses, lora


def transformer_config(model_cfg) -> HeliosTransformerConfig:
  """The architecture of ``config.model`` (``arch`` = ``tiny`` or ``14b``) with its runtime options."""
  runtime = dict(dtype=model_cfg.dtype, remat_policy=model_cfg.remat_policy,
                 attention_implementation=model_cfg.attention_implementation)
  # ``model.overrides``: architecture fields replacing the arch's (e.g. the demo model's width and depth)
  overrides = model_cfg.get("overrides", None) or {}
  overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
  runtime.update({k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in overrides.items()})
  if model_cfg.arch == "tiny":
    return HeliosTransformerConfig.tiny(**runtime)
  if model_cfg.arch == "14b":
    return HeliosTransformerConfig(**runtime)
  raise InputError(f"model.arch must be 'tiny' or '14b', got {model_cfg.arch!r}")


def build_model(model_cfg) -> HeliosTransformer3DModel:
  """The frozen base: ``model.pretrained`` (a diffusers folder) or a random init from ``model.init_seed``."""
  if model_cfg.pretrained:
    dtype = jnp.dtype(model_cfg.dtype)
    return HeliosTransformer3DModel.from_pretrained(model_cfg.pretrained, dtype=dtype,
                                                    attention_implementation=model_cfg.attention_implementation,
                                                    remat_policy=model_cfg.remat_policy)
  return HeliosTransformer3DModel(transformer_config(model_cfg), rngs=nnx.Rngs(int(model_cfg.init_seed)))


def trainable_targets(train_cfg) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(LoRA target regexes, fully trained regexes) from ``config.train`` (spec 5.3 / 6.4)."""
  lora_t = tuple(train_cfg.lora_targets)
  if train_cfg.lora_patch_embedding:
    lora_t += lora.PATCH_EMBEDDING
  full_t: tuple[str, ...] = ()
  if train_cfg.memory_patches == "full":
    full_t = lora.MEMORY_PATCHES
  elif train_cfg.memory_patches == "lora":
    lora_t += lora.MEMORY_PATCH_KERNELS
  elif train_cfg.memory_patches != "frozen":
    raise InputError(f"train.memory_patches must be 'full', 'lora' or 'frozen', got {train_cfg.memory_patches!r}")
  return lora_t, full_t


def init_trainable(frozen_state, train_cfg, seed: int) -> dict:
  lora_t, full_t = trainable_targets(train_cfg)
  return lora.init_trainable(frozen_state, jax.random.key(seed + 7919), mode=train_cfg.mode,
                             rank=int(train_cfg.lora_rank), lora_targets=lora_t, full_targets=full_t)


def lora_scale(train_cfg) -> float:
  return float(train_cfg.lora_alpha) / float(train_cfg.lora_rank)


def tokens_per_step(batch_shape: tuple, stage: str, ratios=(1, 1, 1)) -> int:
  """Transformer tokens processed per step (target + history tokens of every piece), for tokens/s."""
  b, _, t, h, w = batch_shape
  hist = 2 * (h // 2) * (w // 2) + -(-h // 4) * -(-w // 4) + 4 * -(-h // 8) * -(-w // 8)
  if stage == "base":
    return b * (t * h * w // 4 + hist)
  n = len(ratios)
  return b * sum(r * (t * (h >> (n - 1 - i)) * (w >> (n - 1 - i)) // 4 + hist) for i, r in enumerate(ratios))


def make_loss_fn(config, graphdef):
  """``loss(trainable, frozen, batch, key) -> scalar`` for ``config.stage``."""
  draw, pieces_fn = losses.objective(config.stage)
  obj = config.objective
  scale = lora_scale(config.train)

  def loss_fn(trainable, frozen, batch, key):
    chunk = batch["target"].shape[2]
    indices = {k: jnp.asarray(v) for k, v in losses.history_indices(chunk).items()}
    forward = lora.bind(graphdef, frozen, trainable, scale)
    draws = draw(key, batch, obj)
    return losses.loss_from_pieces(forward, pieces_fn(batch, draws, obj), indices)

  return loss_fn


def make_train_step(config, graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    layout=None, example=None):
  """Jitted ``step(state, frozen, batch) -> (state, metrics)``; state buffers are donated.

  The step's PRNG key is ``fold_in(state.rng, state.step)``, so a step is a pure function of (state, batch).
  With a :class:`helios_jax.parallel.layout.TrainLayout` and ``example = (state, frozen)``, the step declares the
  layout's shardings (FSDP state and frozen base, batch over data x fsdp) and runs under its mesh.
  """
  loss_fn = make_loss_fn(config, graphdef)

  def step(state, frozen, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    loss, grads = jax.value_and_grad(loss_fn)(state["trainable"], frozen, batch, key)
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    metrics = dict(loss=loss, grad_norm=optax.global_norm(grads), lr=schedule(state["step"]))
    new = dict(step=state["step"] + 1, rng=state["rng"], trainable=trainable, opt_state=opt_state)
    return new, metrics

  if layout is not None:
    return layout.jit_step(step, *example)
  return jax.jit(step, donate_argnums=(0,))
