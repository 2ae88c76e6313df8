"""Sharding tests (issue 10) on 8 simulated CPU devices, each case in a subprocess (see tests/sharding_cases.py).

The device count of JAX's CPU backend is fixed when the backend starts, and the rest of the suite runs on one
device, so each case runs as ``python tests/sharding_cases.py CASE WORKDIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; the same command reproduces a failure by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helios_jax.parallel import mesh as mesh_lib
from helios_jax.errors import InputError

CASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharding_cases.py")


def run_case(name: str, tmp_path) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  p = subprocess.run([sys.executable, CASES, name, str(tmp_path)], env=env, capture_output=True, text=True,
                     timeout=1800)
  out = p.stdout + p.stderr
  assert p.returncode == 0 and f"PASSED {name}" in p.stdout, f"case {name} failed:\n{out[-6000:]}"
  return out


@pytest.mark.sharding
def test_sharded_training_equals_single_device(tmp_path):
  """Losses and trainables: one device vs train.py on data=2 x fsdp=4, resumed on fsdp=4 x sequence=2."""
  run_case("training", tmp_path)


@pytest.mark.sharding
def test_checkpoint_resharding_round_trip(tmp_path):
  """A state saved on 2x4 restores exactly on 1x8 (resharded), and that one on a single device."""
  run_case("checkpoint", tmp_path)


@pytest.mark.sharding
def test_sharded_sampling_equals_unsharded(tmp_path):
  """Ulysses attention (self, cross, padded, gradients) and the CFG pipeline on data/fsdp/sequence meshes."""
  run_case("sampling", tmp_path)


@pytest.mark.sharding
def test_sharded_ahd_equals_single_device(tmp_path):
  """Stage 3 (tiny DMD): logged metrics on one device vs data=2 x fsdp=4 with host offload, resumed on one device."""
  run_case("ahd", tmp_path)


def test_param_spec_rule():
  # largest divisible dim, never the stacked layer axis, small tensors replicated
  assert mesh_lib.param_spec("blocks.ffn.proj_in.kernel", (40, 5120, 13824), 8) == mesh_lib.P(None, None, "fsdp")
  assert mesh_lib.param_spec("blocks.attn1.to_q.kernel", (40, 5120, 5120), 8) == mesh_lib.P(None, "fsdp", None)
  assert mesh_lib.param_spec("blocks.attn1.to_q.bias", (40, 5120), 8) == mesh_lib.P(None, "fsdp")
  assert mesh_lib.param_spec("blocks.attn1.to_q.bias", (40, 5120), 8, min_size=10 ** 6) == mesh_lib.P()
  assert mesh_lib.param_spec("proj_out.kernel", (5120, 64), 8) == mesh_lib.P("fsdp", None)
  assert mesh_lib.param_spec("lora.blocks.attn1.to_q.kernel.a", (40, 5120, 128), 8) == mesh_lib.P(None, "fsdp", None)
  assert mesh_lib.param_spec("x", (7, 9), 8, min_size=0) == mesh_lib.P()  # nothing divisible
  assert mesh_lib.param_spec("x", (4096, 4096), 1) == mesh_lib.P()


def test_parse_mesh():
  assert mesh_lib.parse_mesh("data=2, sequence=4") == dict(data=2, fsdp=1, sequence=4)
  assert mesh_lib.parse_mesh("") == dict(data=1, fsdp=1, sequence=1)
  for bad in ("cfg=2", "data=0", "data:2"):
    with pytest.raises(InputError):
      mesh_lib.parse_mesh(bad)
  with pytest.raises(InputError, match="needs 64 devices"):
    mesh_lib.make_mesh(dict(data=8, fsdp=8))
