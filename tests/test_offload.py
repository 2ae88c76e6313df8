"""Low-VRAM mode (helios_jax.offload, ``pipe.offload_transformer_layers()``): the per-layer weights live in host
memory and the latents equal the on-device run's exactly (a copy between memory spaces changes no value)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helios_jax import HeliosPyramidPipeline, InputError
from helios_jax import offload
from helios_jax.offload import OffloadedLayers

FIX = os.path.join(os.path.dirname(__file__), "reference", "fixtures", "pipeline")
HOST = offload.host_memory_kind()


def _kinds(tree):
  return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


def test_host_memory_kind_prefers_pinned(monkeypatch):
  monkeypatch.setattr(offload, "memory_kinds", lambda device=None: ("device", "unpinned_host", "pinned_host"))
  assert offload.host_memory_kind() == "pinned_host"
  monkeypatch.setattr(offload, "memory_kinds", lambda device=None: ("device", "unpinned_host"))
  assert offload.host_memory_kind() == "unpinned_host"
  monkeypatch.setattr(offload, "memory_kinds", lambda device=None: ("device",))
  assert offload.host_memory_kind() is None


def test_no_host_memory_degrades_to_device(monkeypatch):
  """A backend without a host memory space: nothing moves, host_kind None says so, indexing still works."""
  monkeypatch.setattr(offload, "memory_kinds", lambda device=None: ())
  layers = [{"w": jnp.full((3,), float(i))} for i in range(3)]
  off = offload.offload_layers(layers)
  assert off.host_kind is None
  assert [float(off[i]["w"][0]) for i in range(3)] == [0.0, 1.0, 2.0]


def test_bad_host_kind_is_an_input_error():
  with pytest.raises(InputError, match="host_kind"):
    offload.offload_layers([{"w": jnp.zeros(2)}], "gpu")


@pytest.mark.skipif(HOST is None, reason="this backend has no host memory space")
def test_layers_move_to_host_and_back_per_index():
  layers = [{"w": jnp.arange(4.0) + i, "b": jnp.ones((2, 2)) * i} for i in range(4)]
  off = offload.offload_layers(layers)
  assert off.host_kind == HOST and _kinds(off.layers) == {HOST}
  assert all(x.is_deleted() for x in jax.tree.leaves(layers))  # device copies freed as each leaf moved
  got = off[2]
  assert _kinds(got) == {"device"}
  np.testing.assert_array_equal(got["w"], np.arange(4.0) + 2)
  assert 3 in off._fetched  # the next layer's copy was issued with it
  assert off[-1]["b"][0, 0] == 3 and len(off[1:3]) == 2
  with pytest.raises(IndexError):
    off[4]
  assert offload.offload_layers(off) is off  # already offloaded


@pytest.mark.skipif(HOST is None, reason="this backend has no host memory space")
def test_offloaded_layers_inside_jit_are_fetched_to_device():
  """A pytree through jit: the arguments stay in host memory, the program copies each layer in; same sums."""
  layers = offload.offload_layers([{"w": jnp.full((8,), i + 1.0)} for i in range(5)])

  @jax.jit
  def run(ls, x):
    assert isinstance(ls, OffloadedLayers) and len(ls) == 5
    for i in range(len(ls)):
      x = x * ls[i]["w"]
    return x

  out = run(layers, jnp.ones(8))
  np.testing.assert_array_equal(out, np.full(8, 120.0))
  assert _kinds(layers.layers) == {HOST}
  assert "pinned_host" in run.lower(layers, jnp.ones(8)).as_text() or HOST != "pinned_host"


@pytest.mark.parametrize("setting", ["distilled", "mid"])
def test_offloaded_pipeline_equals_normal_mode_exactly(setting):
  """The tiny fixture pipeline, 2 chunks: offloaded latents == on-device per-layer latents, bit for bit."""
  pipe = HeliosPyramidPipeline.from_pretrained(os.path.join(FIX, setting), dtype=jnp.float32, load_vae=False)
  text_dim = pipe.transformer.config.text_dim
  emb = np.asarray(jax.random.normal(jax.random.key(0), (1, 6, text_dim)), np.float32)
  steps = (1, 1, 1) if setting == "distilled" else (2, 1, 1)
  call = dict(prompt_embeds=emb, negative_prompt_embeds=emb * 0.5, height=64, width=128, num_frames=66,
              guidance_scale=1.0 if setting == "distilled" else 3.0, pyramid_num_inference_steps_list=steps,
              output_type="latent", progress=False, seed=3)
  pipe.unstack_transformer_layers()
  normal = np.asarray(pipe(**call).frames)
  kind = pipe.offload_transformer_layers()
  assert kind == HOST
  layers = pipe._split[1][1]
  assert isinstance(layers, OffloadedLayers) and len(layers) == pipe.transformer.config.num_layers
  if HOST is not None:
    assert _kinds(layers.layers) == {HOST}
  offloaded = np.asarray(pipe(**call).frames)
  np.testing.assert_array_equal(offloaded, normal)
  assert not np.allclose(normal, 0)
