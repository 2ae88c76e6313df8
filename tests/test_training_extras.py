"""Training extras on the CPU: per-layer LoRA in the block scan, TensorBoard metrics, validation sampling, the
train-memory benchmark's dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import base as base_config  # noqa: E402

from helios_jax.training import data, losses, lora, metrics, stages  # noqa: E402
from helios_jax.training.trainer import make_source  # noqa: E402


def _small(cfg):
  cfg.data.height = 8
  cfg.data.width = 8
  cfg.data.num_clips = 4
  return cfg


def _random_trainable(frozen, train_cfg, seed=0):
  """Trainables with non-zero B and perturbed full tensors, so every adapter changes the output."""
  tr = stages.init_trainable(frozen, train_cfg, seed)
  leaves, treedef = jax.tree.flatten(tr)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


def _merged_forward(graphdef, frozen, trainable, scale):
  """Reference: the whole model merged (the pre-scan path)."""
  return nnx.merge(graphdef, lora.effective_state(frozen, trainable, scale)).forward


@pytest.mark.parametrize("mode,remat", [("lora", "full"), ("full", "dots")])
def test_per_layer_lora_equals_merged_model(mode, remat):
  """Forward values and gradients w.r.t. A, B and fully trained tensors: per-layer path == whole merged model."""
  cfg = _small(base_config.get_config("tiny"))
  cfg.model.remat_policy = remat
  cfg.train.mode = mode
  graphdef, frozen = nnx.split(stages.build_model(cfg.model))
  tr = _random_trainable(frozen, cfg.train)
  blocks, rest = lora.split_blocks(tr)
  assert (blocks["lora"] or blocks["full"]) and (rest["lora"] or rest["full"])
  scale = stages.lora_scale(cfg.train)
  cfg.objective.random_drop = False  # every history stream non-zero, so memory patches get gradients
  batch = data.get_batch(make_source(cfg), 2, cfg.batch_size, cfg.data.seed)
  piece = losses.stage1_pieces(batch, losses.draw_stage1(jax.random.key(3), batch, cfg.objective),
                               cfg.objective)[0]
  idx = {k: jnp.asarray(v) for k, v in losses.history_indices(batch["target"].shape[2]).items()}

  def run(make):
    def loss(t):
      out = make(graphdef, frozen, t, scale)(**piece["inputs"], **idx)
      return jnp.mean(jnp.square(out - piece["target"])), out
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(tr)

  (_, out), grads = run(lora.bind)
  (_, want), ref = run(_merged_forward)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
  flat_ours, flat_ref = lora.named_params(grads), lora.named_params(ref)
  assert flat_ours.keys() == flat_ref.keys()
  for name, g in flat_ref.items():
    assert float(jnp.abs(g).max()) > 0, name  # every trainable gets a gradient
    np.testing.assert_allclose(np.asarray(flat_ours[name]), np.asarray(g), rtol=2e-4,
                               atol=2e-5 * float(jnp.abs(g).max()), err_msg=name)


def test_bind_never_builds_a_merged_block_stack():
  """The jitted loss holds no (L, in, out) adapted kernel: block deltas exist only per layer inside the scan."""
  cfg = _small(base_config.get_config("tiny"))
  graphdef, frozen = nnx.split(stages.build_model(cfg.model))
  tr = _random_trainable(frozen, cfg.train)
  x = jnp.zeros((1, 4, 9, 8, 8))
  idx = {k: jnp.asarray(v) for k, v in losses.history_indices(9).items()}

  def fwd(make):
    return jax.make_jaxpr(lambda t: make(graphdef, frozen, t, 1.0)(x, jnp.ones((1,)), jnp.zeros((1, 2, 32)),
                                                                    idx["indices_hidden_states"]))(tr)

  def stacked_dots(jaxpr):  # dot_generals at top level producing a (layers, in, out) tensor
    return [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"
            and e.outvars[0].aval.shape[:1] == (2,) and len(e.outvars[0].aval.shape) == 3]

  assert stacked_dots(fwd(_merged_forward))  # the reference merges the whole stack up front
  assert not stacked_dots(fwd(lora.bind))
