"""Reading (and writing) diffusers / transformers model folders without torch.

A component folder looks like one of::

    transformer/config.json + diffusion_pytorch_model.safetensors
    transformer/config.json + diffusion_pytorch_model-0000k-of-0000N.safetensors
                            + diffusion_pytorch_model.safetensors.index.json   ({"weight_map": {key: shard}})
    text_encoder/config.json + model.safetensors | model-0000k-of-0000N.safetensors + model.safetensors.index.json

:class:`SafetensorsFolder` opens such a folder lazily: tensors are read one at a time from memory-mapped files
(``safetensors.safe_open(..., framework="np")``), so converting a 14B checkpoint never holds two copies of it in
host memory. bf16 tensors come back as ``ml_dtypes.bfloat16`` numpy arrays.

Folders are untrusted input (docs/reliability.md): pickle weights (``*.bin``, ``*.pt``, ...) are refused unread,
never unpickled; an index whose ``weight_map`` names a file outside the folder (``../``, an absolute path, a symlink
leading out) is refused (symlinks into a Hugging Face cache's ``blobs/`` are its normal layout and allowed); a
safetensors file shorter than its header says is reported as truncated; configs must be JSON objects whose sizes
pass :func:`helios_jax.io.config_checks.check_sizes`.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from helios_jax.errors import CheckpointError
from helios_jax.io.config_checks import check_sizes

DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model"
TRANSFORMERS_WEIGHTS_NAME = "model"
# PyTorch pickle formats: loading one runs arbitrary code, so they are refused, never opened.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFETENSORS_HEADER_BYTES = 8  # a safetensors file starts with its JSON header's length, little-endian uint64


def load_json(path: str, what: str = "file") -> dict:
  """Reads a JSON file, turning a missing or corrupt file into a :class:`CheckpointError`."""
  if not os.path.isfile(path):
    raise CheckpointError(f"missing {what}: {path} does not exist")
  try:
    with open(path, encoding="utf-8") as f:
      out = json.load(f)
  except ValueError as e:  # also UnicodeDecodeError: a binary file
    raise CheckpointError(f"{what} {path} is not valid JSON ({e})") from None
  except OSError as e:
    raise CheckpointError(f"cannot read {what} {path}: {e}") from None
  if not isinstance(out, dict):
    raise CheckpointError(f"{what} {path} is not a JSON object (found a {type(out).__name__})")
  return out


def load_config(folder: str) -> dict:
  """Returns the ``config.json`` of a component folder as a dict (keys starting with ``_`` kept), its sizes
  checked (:func:`~helios_jax.io.config_checks.check_sizes`) before any model is built from it."""
  if not os.path.isdir(folder):
    raise CheckpointError(f"model folder not found: {folder}")
  path = os.path.join(folder, "config.json")
  config = load_json(path, "config.json")
  check_sizes(config, path)
  return config


class SafetensorsFolder:
  """Lazy, streaming view over the safetensors weights of one component folder.

  Args:
    folder: the component folder (e.g. ``.../transformer``).
    weights_name: file stem, ``"diffusion_pytorch_model"`` (diffusers) or ``"model"`` (transformers). When
      ``None`` both are tried.
  """

  def __init__(self, folder: str, weights_name: str | None = None):
    if not os.path.isdir(folder):
      raise CheckpointError(f"model folder not found: {folder}")
    self.folder = folder
    names = [weights_name] if weights_name else [DIFFUSERS_WEIGHTS_NAME, TRANSFORMERS_WEIGHTS_NAME]
    self._key_to_file: dict[str, str] = {}
    for name in names:
      single = os.path.join(folder, f"{name}.safetensors")
      index = os.path.join(folder, f"{name}.safetensors.index.json")
      if os.path.isfile(index):
        weight_map = load_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
          raise CheckpointError(f"safetensors index {index} has no 'weight_map'")
        for f in sorted(set(weight_map.values())):
          _check_inside(folder, f, index)
        missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(folder, f))})
        if missing:
          raise CheckpointError(
              f"checkpoint shard(s) missing in {folder}: {', '.join(missing)} (listed in {os.path.basename(index)})")
        self._key_to_file = {k: os.path.join(folder, f) for k, f in weight_map.items()}
        break
      if os.path.isfile(single):
        _check_inside(folder, os.path.basename(single), single)
        with _open(single) as f:
          self._key_to_file = {k: single for k in f.keys()}
        break
    else:
      pickles = sorted(n for n in os.listdir(folder) if n.lower().endswith(PICKLE_SUFFIXES))
      if pickles:
        raise CheckpointError(
            f"{folder} has only PyTorch pickle weights ({', '.join(pickles)}), which are not loaded because "
            f"unpickling can run arbitrary code: convert them to {names[0]}.safetensors (e.g. with safetensors' "
            "convert script or torch.load + safetensors.torch.save_file in a trusted environment)")
      raise CheckpointError(
          f"no weights in {folder}: expected {names[0]}.safetensors or {names[0]}.safetensors.index.json")
    self._handles: dict[str, object] = {}

  def keys(self) -> list[str]:
    return list(self._key_to_file)

  def __contains__(self, key: str) -> bool:
    return key in self._key_to_file

  def __len__(self) -> int:
    return len(self._key_to_file)

  def _handle(self, path: str):
    if path not in self._handles:
      self._handles[path] = _open(path).__enter__()
    return self._handles[path]

  def get(self, key: str) -> np.ndarray:
    """Reads one tensor as a numpy array in its stored dtype."""
    if key not in self._key_to_file:
      raise CheckpointError(f"tensor {key!r} not found in {self.folder}")
    path = self._key_to_file[key]
    handle = self._handle(path)
    try:
      return handle.get_tensor(key)
    except Exception as e:  # a weight_map entry that the shard does not hold, or a truncated file
      raise CheckpointError(f"cannot read tensor {key!r} from {path}: {e}") from None

  def shape(self, key: str) -> tuple[int, ...]:
    path = self._key_to_file[key]
    return tuple(self._handle(path).get_slice(key).get_shape())

  def items(self) -> Iterator[tuple[str, np.ndarray]]:
    for key in self._key_to_file:
      yield key, self.get(key)

  def close(self):
    for h in self._handles.values():
      h.__exit__(None, None, None)
    self._handles.clear()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _hub_blobs(folder: str) -> str | None:
  """The ``blobs/`` folder of the Hugging Face cache repo holding ``folder`` (``.../snapshots/<rev>/...``), if any."""
  parts = os.path.realpath(folder).split(os.sep)
  if "snapshots" not in parts:
    return None
  i = len(parts) - 1 - parts[::-1].index("snapshots")
  if i + 1 >= len(parts):
    return None
  return os.sep.join(parts[:i] + ["blobs"])


def _within(path: str, root: str) -> bool:
  return os.path.commonpath([path, root]) == root


def _check_inside(folder: str, name: str, source: str) -> None:
  """Refuses a weight file ``name`` (as listed by ``source``) that leads outside ``folder``."""
  if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
    raise CheckpointError(f"{source} lists weight file {name!r} outside the folder {folder}; refusing to read it")
  root = os.path.realpath(folder)
  target = os.path.realpath(os.path.join(folder, name))
  blobs = _hub_blobs(folder)
  if not (_within(target, root) or (blobs is not None and _within(target, blobs))):
    raise CheckpointError(f"{os.path.join(folder, name)} is a link to {target}, outside the folder {folder}; "
                          "refusing to read it")


def _check_complete(path: str) -> None:
  """Raises a clear :class:`CheckpointError` when ``path`` is shorter than its safetensors header says."""
  size = os.path.getsize(path)
  try:
    with open(path, "rb") as f:
      head = f.read(SAFETENSORS_HEADER_BYTES)
      n = int.from_bytes(head, "little") if len(head) == SAFETENSORS_HEADER_BYTES else -1
      if n < 0 or SAFETENSORS_HEADER_BYTES + n > size:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes, too short for its "
                              "header)")
      header = json.loads(f.read(n))
  except (ValueError, UnicodeDecodeError):
    raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON)") from None
  ends = [int(v["data_offsets"][1]) for k, v in header.items()
          if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets", ())) == 2]
  need = SAFETENSORS_HEADER_BYTES + n + max(ends, default=0)
  if size < need:
    raise CheckpointError(f"{path} is truncated: {size} bytes, its header describes {need} (re-download or "
                          "re-convert it)")


def _open(path: str):
  _check_complete(path)
  try:
    return safe_open(path, framework="np")
  except Exception as e:
    raise CheckpointError(f"cannot open safetensors file {path}: {e}") from None


def save_safetensors_folder(folder: str, tensors: dict[str, np.ndarray], config: dict | None,
                            weights_name: str = DIFFUSERS_WEIGHTS_NAME, max_shard_bytes: int | None = None,
                            metadata: dict | None = None) -> None:
  """Writes ``tensors`` (numpy, any dtype incl. bfloat16) in the diffusers on-disk layout.

  With ``max_shard_bytes`` the tensors are split into ``{weights_name}-0000k-of-0000N.safetensors`` shards plus
  an index file, the way ``save_pretrained`` does; otherwise one file is written.
  """
  os.makedirs(folder, exist_ok=True)
  if config is not None:
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, sort_keys=True)
  meta = {"format": "pt", **(metadata or {})}
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  if not max_shard_bytes:
    save_file(tensors, os.path.join(folder, f"{weights_name}.safetensors"), metadata=meta)
    return
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for k, v in tensors.items():
    if shards[-1] and size + v.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][k] = v
    size += v.nbytes
  n = len(shards)
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"{weights_name}-{i + 1:05d}-of-{n:05d}.safetensors"
    save_file(shard, os.path.join(folder, fname), metadata=meta)
    weight_map.update({k: fname for k in shard})
  index = {"metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))}, "weight_map": weight_map}
  with open(os.path.join(folder, f"{weights_name}.safetensors.index.json"), "w", encoding="utf-8") as f:
    json.dump(index, f, indent=2, sort_keys=True)


def iter_prefixed(keys: Iterable[str], prefix: str) -> list[str]:
  return [k for k in keys if k.startswith(prefix)]


# ------------------------------------------------------------------------------------------------------------
# Writers for save_pretrained (streaming, one shard in host memory at a time)
# ------------------------------------------------------------------------------------------------------------

# The default shard sizes of the two libraries' save_pretrained (diffusers' ModelMixin, transformers'
# PreTrainedModel), in decimal units as both parse them.
DIFFUSERS_MAX_SHARD_SIZE = "10GB"
TRANSFORMERS_MAX_SHARD_SIZE = "5GB"
_SIZE_UNITS = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
               "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40, "B": 1}


def parse_shard_size(size) -> int:
  """``max_shard_size`` as bytes: an int, or a string such as ``"10GB"``, ``"500MB"``, ``"2GiB"``.

  Raises:
    InputError: not a positive size.
  """
  from helios_jax.errors import InputError  # pylint: disable=import-outside-toplevel
  if isinstance(size, bool):
    raise InputError(f"max_shard_size must be a number of bytes or a string like '10GB', got {size!r}")
  if isinstance(size, (int, np.integer)):
    if size <= 0:
      raise InputError(f"max_shard_size must be positive, got {size}")
    return int(size)
  if isinstance(size, str):
    text = size.strip().upper().replace(" ", "")
    for unit in sorted(_SIZE_UNITS, key=len, reverse=True):
      if text.endswith(unit) and text[:-len(unit)]:
        try:
          value = float(text[:-len(unit)])
        except ValueError:
          break
        if value > 0:
          return int(value * _SIZE_UNITS[unit])
        break
  raise InputError(f"max_shard_size must be a positive number of bytes or a string like '10GB', got {size!r}")


class TensorEntry:
  """One tensor to write: its name, (torch-layout) shape, numpy dtype and a function that produces it.

  ``load()`` is called once, when the tensor's shard is written, so a writer never holds more than one shard.
  """

  def __init__(self, key: str, shape: tuple[int, ...], dtype, load):
    self.key, self.shape, self.dtype, self.load = key, tuple(int(s) for s in shape), np.dtype(dtype), load

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def write_weights_folder(folder: str, entries: list[TensorEntry], config: dict | None,
                         weights_name: str = DIFFUSERS_WEIGHTS_NAME, max_shard_size=DIFFUSERS_MAX_SHARD_SIZE,
                         metadata: dict | None = None) -> list[str]:
  """Writes a component folder the way diffusers' / transformers' ``save_pretrained`` lays it out.

  One ``{weights_name}.safetensors`` when the tensors fit in ``max_shard_size``; otherwise
  ``{weights_name}-0000k-of-0000N.safetensors`` shards (tensors kept whole, in order, a new shard when the next
  tensor would pass the limit) plus ``{weights_name}.safetensors.index.json``. Weight files of an earlier save
  with the same stem are removed first (a stale index would otherwise win over a new single file).

  Returns:
    The weight file names written.
  """
  limit = parse_shard_size(max_shard_size)
  os.makedirs(folder, exist_ok=True)
  for name in os.listdir(folder):
    if name.startswith(weights_name) and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json")):
      os.remove(os.path.join(folder, name))
  if config is not None:
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, sort_keys=True)
  meta = {"format": "pt", **(metadata or {})}
  shards: list[list[TensorEntry]] = [[]]
  size = 0
  for e in entries:
    if shards[-1] and size + e.nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += e.nbytes
  n = len(shards)
  names = ([f"{weights_name}.safetensors"] if n == 1 else
           [f"{weights_name}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
  for fname, shard in zip(names, shards):
    tensors = {}
    for e in shard:
      arr = np.ascontiguousarray(e.load())
      if arr.shape != e.shape or arr.dtype != e.dtype:
        raise AssertionError(f"{e.key}: produced {arr.shape} {arr.dtype}, planned {e.shape} {e.dtype}")
      tensors[e.key] = arr
    save_file(tensors, os.path.join(folder, fname), metadata=meta)
    del tensors
  if n > 1:
    index = {"metadata": {"total_size": int(sum(e.nbytes for e in entries))},
             "weight_map": {e.key: fname for fname, shard in zip(names, shards) for e in shard}}
    with open(os.path.join(folder, f"{weights_name}.safetensors.index.json"), "w", encoding="utf-8") as f:
      json.dump(index, f, indent=2, sort_keys=True)
  return names


def entries_from_arrays(tensors: dict[str, np.ndarray]) -> list[TensorEntry]:
  """:class:`TensorEntry` list over arrays already in host memory (small models)."""
  return [TensorEntry(k, v.shape, v.dtype, (lambda v=v: v)) for k, v in tensors.items()]
