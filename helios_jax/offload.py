"""Low-VRAM sampling: the transformer's per-layer block weights kept in host memory, each layer brought to the
device inside the jitted program one layer ahead of its use, so XLA overlaps the copy with the previous layer's
compute (the official ``--enable_low_vram_mode`` does the same with group offload in PyTorch).

The pieces:

* :func:`host_memory_kind` picks where the weights live: ``"pinned_host"`` (page-locked, DMA-able: the fast path
  on GPUs), else ``"unpinned_host"``, else None when the backend has no host memory space (then nothing moves and
  the weights stay on the device; :func:`offload_layers` says so in its return value).
* :class:`OffloadedLayers` is a pytree over ``num_layers`` per-layer block states (as
  :func:`helios_jax.models.transformer.unstack_blocks` makes them). It is what the pipelines pass as
  ``forward(layer_states=...)``: indexing it inside a traced program returns the layer moved to device memory
  (``jax.device_put(..., jax.memory.Space.Device)``) and issues the next layer's copy at the same time, so the
  program holds at most two layers' weights on the device at once.
* :func:`offload_layers` moves per-layer states into host memory leaf by leaf (each device copy deleted after its
  transfer, so device memory only shrinks).

Outside a trace (eager code) indexing fetches the same way. The numbers are identical to the on-device run: a copy
between memory spaces does not change a value (``tests/test_offload.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from helios_jax.errors import InputError

HOST_KINDS = ("pinned_host", "unpinned_host")  # in order of preference


def memory_kinds(device: jax.Device | None = None) -> tuple[str, ...]:
  """The memory kinds ``device`` (default: the first local device) can address, e.g. ``("device", "pinned_host",
  "unpinned_host")``; () where the backend does not report them."""
  device = device or jax.local_devices()[0]
  try:
    return tuple(m.kind for m in device.addressable_memories())
  except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
    return ()


def host_memory_kind(device: jax.Device | None = None) -> str | None:
  """The host memory kind to offload to on ``device``: ``"pinned_host"`` if it has one, else ``"unpinned_host"``,
  else None (no host memory space: offloading is not possible and the weights stay on the device)."""
  kinds = memory_kinds(device)
  return next((k for k in HOST_KINDS if k in kinds), None)


def _to_device(tree: Any) -> Any:
  """``tree``'s arrays moved to device memory (inside a trace: a copy XLA schedules asynchronously)."""
  return jax.device_put(tree, jax.memory.Space.Device)


@jax.tree_util.register_pytree_node_class
class OffloadedLayers(Sequence):
  """``num_layers`` per-layer block states kept in host memory; ``layers[i]`` is layer ``i`` on the device.

  Indexing ``i`` also starts the transfer of layer ``i + 1`` (kept until it is asked for), so in the transformer's
  layer loop every layer's weights are copied while the layer before it computes: XLA's scheduler overlaps the
  host-to-device copy with the matmuls, and at most two layers are on the device at a time. ``host_kind`` None
  means the layers are already on the device (a backend without host memory): indexing returns them as they are.

  Args:
    layers: the per-layer states (pytrees of arrays, each leaf one layer's parameter, e.g. (5120, 5120)).
    host_kind: the memory kind they are stored in (``"pinned_host"`` / ``"unpinned_host"``), or None.
  """

  def __init__(self, layers: Sequence[Any], host_kind: str | None):
    self.layers = list(layers)
    self.host_kind = host_kind
    self._fetched: dict[int, Any] = {}

  def tree_flatten(self):
    return tuple(self.layers), self.host_kind

  @classmethod
  def tree_unflatten(cls, host_kind, children):
    return cls(children, host_kind)

  def __len__(self) -> int:
    return len(self.layers)

  def _fetch(self, i: int) -> Any:
    return self.layers[i] if self.host_kind is None else _to_device(self.layers[i])

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    i = range(len(self))[i]  # negative indices; IndexError past the end
    layer = self._fetched.pop(i) if i in self._fetched else self._fetch(i)
    if i + 1 < len(self) and i + 1 not in self._fetched:
      self._fetched[i + 1] = self._fetch(i + 1)  # one layer ahead
    return layer

  def on_device(self) -> list:
    """The layers as a plain list of device arrays (the normal, non-offloaded mode); this object is unchanged."""
    return [self._fetch(i) for i in range(len(self))]

  def nbytes(self) -> int:
    """Bytes of all layers' weights."""
    return sum(x.nbytes for x in jax.tree.leaves(self.layers))

  def __repr__(self) -> str:
    return f"OffloadedLayers({len(self)} layers, {self.nbytes() / 2**30:.2f} GiB in {self.host_kind or 'device'})"


def to_host(tree: Any, host_kind: str) -> Any:
  """``tree``'s arrays moved to ``host_kind`` memory leaf by leaf, each device array deleted once copied (device
  memory never holds more than the arrays it had)."""

  def move(x):
    if not isinstance(x, jax.Array):
      return x
    moved = jax.device_put(x, x.sharding.with_memory_kind(host_kind))
    moved.block_until_ready()
    if moved is not x:
      x.delete()
    return moved

  return jax.tree.map(move, tree)


def offload_layers(layers: Sequence[Any], host_kind: str | None = "auto") -> OffloadedLayers:
  """Per-layer block states -> :class:`OffloadedLayers` in host memory (``"auto"``: :func:`host_memory_kind`).

  With ``host_kind=None``, or ``"auto"`` on a backend without a host memory space, the layers stay where they are
  (``result.host_kind`` is None: the caller should say that nothing was offloaded)."""
  if isinstance(layers, OffloadedLayers):
    if host_kind in ("auto", layers.host_kind) and layers.host_kind is not None:
      return layers
    layers = layers.on_device() if layers.host_kind is not None else layers.layers
  if host_kind == "auto":
    host_kind = host_memory_kind()
  if host_kind is not None and host_kind not in HOST_KINDS:
    raise InputError(f"host_kind must be one of {HOST_KINDS}, 'auto' or None, got {host_kind!r}")
  if host_kind is None:
    return OffloadedLayers(layers, None)
  return OffloadedLayers([to_host(layer, host_kind) for layer in layers], host_kind)
