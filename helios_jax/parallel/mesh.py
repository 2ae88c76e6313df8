"""The device mesh and the sharding rules of helios-jax (JAX's own sharding: Mesh, NamedSharding, PartitionSpec).

One mesh with three named axes serves training and sampling:

* ``data``: batch parallelism (training: samples; sampling: the conditional / unconditional CFG branches).
* ``fsdp``: parameters, optimiser state (and any EMA) split over devices; the batch is split over it too, so
  ``fsdp`` is data parallelism whose replicas hold a shard of every large tensor (ZeRO-3), as the reference's
  DeepSpeed setup does.
* ``sequence``: the transformer's token axis inside attention (Ulysses all-to-all over heads,
  :mod:`helios_jax.parallel.sequence`).

Parameter rule (:func:`param_spec`): a tensor with at least ``fsdp_min_size`` elements is split over ``fsdp`` along
its largest dimension that ``fsdp`` divides, never along the leading layer axis of the stacked blocks (the forward
``lax.scan``s over it, so sharding it would gather every layer at once); everything else is replicated. The rule
reads only names and shapes, so it applies unchanged to the frozen base (``nnx.State``), the trainables, optax
state (whose ``mu``/``nu`` mirror the trainables) and an EMA copy.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from helios_jax.errors import InputError

AXES = ("data", "fsdp", "sequence")
BATCH_AXES = ("data", "fsdp")
# Tensors below this many elements stay replicated: gathering a norm scale or a bias costs a collective's latency
# for no memory gain (2**16 float32 = 256 KiB; a 14B block's smallest kernel has 2.6e7 elements).
DEFAULT_FSDP_MIN_SIZE = 2 ** 16


def add_mesh_config(config, data: int = 1, fsdp: int = 1, sequence: int = 1,
                    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> None:
  """Adds the ``config.mesh`` block (defaults: one device) to an ml-collections training config.

  One line in any stage's config file: ``add_mesh_config(c)``. Override from the command line with
  ``--config.mesh.data=2 --config.mesh.fsdp=4``.
  """
  import ml_collections  # configs only; the GPU machine runs without ml-collections
  config.mesh = ml_collections.ConfigDict(dict(data=int(data), fsdp=int(fsdp), sequence=int(sequence),
                                               fsdp_min_size=int(fsdp_min_size)))


def mesh_shape(mesh_cfg) -> dict[str, int]:
  """``{axis: size}`` of a ``config.mesh`` block (``None`` or missing axes: 1), validated."""
  shape = {}
  for axis in AXES:
    v = 1 if mesh_cfg is None else mesh_cfg.get(axis, 1)
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
      raise InputError(f"mesh.{axis} must be a positive integer, got {v!r}")
    shape[axis] = int(v)
  return shape


def parse_mesh(text: str) -> dict[str, int]:
  """``"data=2,sequence=4"`` -> ``{"data": 2, "fsdp": 1, "sequence": 4}`` (the ``sample.py --mesh`` syntax)."""
  shape = dict.fromkeys(AXES, 1)
  for part in filter(None, (p.strip() for p in text.split(","))):
    m = re.fullmatch(r"(\w+)\s*=\s*(\d+)", part)
    if m is None or m.group(1) not in shape:
      raise InputError(f"--mesh takes axis=size pairs over {', '.join(AXES)} (e.g. data=2,sequence=4), got {text!r}")
    shape[m.group(1)] = int(m.group(2))
  return mesh_shape(shape)


def make_mesh(shape: dict[str, int] | None = None, devices=None) -> Mesh:
  """A ``Mesh`` over the first ``data * fsdp * sequence`` devices (all processes' devices in a multi-host run).

  Axis types are ``Auto`` (GSPMD propagation; ``jax.make_mesh`` would default to ``Explicit``).
  """
  shape = mesh_shape(shape)
  devices = list(jax.devices() if devices is None else devices)
  n = math.prod(shape.values())
  if n > len(devices):
    raise InputError(f"the mesh {format_mesh(shape)} needs {n} devices, {len(devices)} are available")
  sizes = tuple(shape[a] for a in AXES)
  return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices[:n])


def format_mesh(shape) -> str:
  shape = shape.shape if isinstance(shape, Mesh) else shape
  return "x".join(f"{a}={shape[a]}" for a in AXES)


def axis_size(mesh, axis: str) -> int:
  """Size of ``axis`` in a (concrete or abstract) mesh; 1 for an empty mesh or a missing axis."""
  if mesh is None or getattr(mesh, "empty", False):
    return 1
  return int(dict(mesh.shape).get(axis, 1))


def batch_axes(mesh, batch: int) -> tuple[str, ...]:
  """The batch axes (``data`` then ``fsdp``, those > 1) that together divide ``batch``; () when none do."""
  axes, prod = [], 1
  for a in BATCH_AXES:
    n = axis_size(mesh, a)
    if n > 1 and batch % (prod * n) == 0:
      axes.append(a)
      prod *= n
  return tuple(axes)


def batch_split(mesh) -> int:
  """How many ways the training batch is split (``data * fsdp``)."""
  return axis_size(mesh, "data") * axis_size(mesh, "fsdp")


# ----------------------------------------------------------------------------------------------------------------------
# Parameter sharding rules

def path_name(path) -> str:
  """Dotted name of a pytree path: dict keys, sequence indices and attributes (optax states' ``mu``/``nu``)."""
  parts = []
  for p in path:
    for attr in ("key", "idx", "name"):
      if hasattr(p, attr):
        parts.append(str(getattr(p, attr)))
        break
  return ".".join(parts)


def is_stacked(name: str) -> bool:
  """Whether a parameter carries the stacked blocks' leading layer axis (its dotted name has a ``blocks`` part)."""
  return "blocks" in re.split(r"[./]", name)


def param_spec(name: str, shape: tuple[int, ...], fsdp: int, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
  """The ``PartitionSpec`` of one parameter-like tensor under ``fsdp``-way sharding (module docstring's rule)."""
  if fsdp <= 1 or len(shape) == 0 or math.prod(shape) < min_size:
    return P()
  first = 1 if is_stacked(name) and len(shape) > 1 else 0
  dims = [i for i in range(first, len(shape)) if shape[i] % fsdp == 0]
  if not dims:
    return P()
  best = max(dims, key=lambda i: (shape[i], -i))  # largest dim, first on ties
  return P(*[("fsdp" if i == best else None) for i in range(len(shape))])


def param_shardings(tree, mesh: Mesh, min_size: int = DEFAULT_FSDP_MIN_SIZE):
  """A pytree of ``NamedSharding`` matching ``tree`` (arrays or ``ShapeDtypeStruct``s) under :func:`param_spec`."""
  fsdp = axis_size(mesh, "fsdp")
  return jax.tree_util.tree_map_with_path(
      lambda p, x: NamedSharding(mesh, param_spec(path_name(p), tuple(x.shape), fsdp, min_size)), tree)


def batch_sharding(mesh: Mesh, batch: int, ndim: int = 1) -> NamedSharding:
  """Leading-axis batch sharding over the batch axes that divide ``batch``."""
  axes = batch_axes(mesh, batch)
  return NamedSharding(mesh, P(axes if axes else None, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def place(tree, shardings):
  """Puts every leaf of ``tree`` (JAX or NumPy arrays) on its sharding.

  Single process: ``jax.device_put``. Several processes: every process holds the same full value (same seed, same
  files), and each builds only its addressable shards (``jax.make_array_from_callback``).
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def one(x, s):
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

  return jax.tree.map(one, tree, shardings)


def abstract(tree, shardings) -> Any:
  """``ShapeDtypeStruct``s of ``tree`` carrying ``shardings`` (restore targets, memory analysis)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def current_mesh():
  """The mesh made current by ``jax.set_mesh`` (abstract inside ``jit``), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def constrain_batch(x: jax.Array) -> jax.Array:
  """Inside a traced function under ``jax.set_mesh``: shard ``x``'s leading (batch) axis over the batch axes.

  Used for CFG-parallel sampling: the doubled [conditional; unconditional] batch lands half on each ``data`` group.
  A no-op without a mesh or when no batch axis divides the batch.
  """
  mesh = current_mesh()
  if mesh is None:
    return x
  axes = batch_axes(mesh, x.shape[0])
  if not axes:
    return x
  return jax.lax.with_sharding_constraint(x, P(axes, *([None] * (x.ndim - 1))))
