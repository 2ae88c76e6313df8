"""orbax-checkpoint saving and resuming of the train state (trainables, optimiser state, step, RNG, data position).

Layout: ``WORKDIR/checkpoints/<step>/{state,meta}``. ``meta`` is JSON: the step (= data position, see
``helios_jax.training.data``), the seed and the config, checked on resume so a changed config is not silently mixed.

Crash safety (docs/reliability.md): orbax writes each checkpoint into ``<step>.orbax-checkpoint-tmp`` and renames it
into place only once every item is written, so a process killed at any moment leaves either the previous checkpoints
or the complete new one; leftover temporary folders are removed when the next run opens the directory. A save that
fails because the disk is full removes its temporary folder and raises :class:`~helios_jax.errors.DiskFullError`;
the checkpoints already there are untouched (older ones are only deleted after a new one is complete).

Test-only fault injection: ``HELIOS_FAULT_INJECT`` (unset in normal use) makes a save misbehave on purpose, so the
fault-injection tests (tests/test_faults_*.py) can drive ``train.py`` through its CLI:

* ``kill_during_save:STEP[:N]``: SIGKILL the process inside the save of step STEP, when orbax is about to commit
  its N-th temporary folder (N = 1, the default: every item written, none committed; 2: the first item committed;
  3: both items committed, the step folder not yet renamed into place);
* ``kill_after_save:STEP``: SIGKILL right after step STEP's checkpoint is complete;
* ``enospc_during_save:STEP[:N]``: raise ``OSError(ENOSPC)`` at the same point as ``kill_during_save`` (a full disk).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import signal

import jax
import orbax.checkpoint as ocp

from helios_jax.errors import CheckpointError
from helios_jax.io.disk_space import disk_full_error, is_disk_full

# Fields that may change between an interrupted run and its resumption.
# ``mesh``: a run saved on one mesh resumes on another (orbax reshards into the template's shardings);
# ``offload`` (stage 3): where arrays live between phases, also taken from the template on restore.
RESUMABLE_CHANGES = ("total_steps", "checkpoint", "log_every", "export_merged", "mesh", "offload")

FAULT_ENV = "HELIOS_FAULT_INJECT"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a checkpoint folder that is still being written


class Checkpointer:
  """Keeps the last ``keep`` checkpoints under ``WORKDIR/checkpoints``."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    # cleanup_tmp_directories: a run killed inside a save left ``<step>.orbax-checkpoint-tmp``; it is never a
    # checkpoint (latest_step ignores it) and would block saving that step again.
    options = ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: dict, meta: dict) -> int:
    step = int(jax.device_get(state["step"]))
    if step in self.manager.all_steps():
      return step
    fault = _fault_for(step)
    try:
      with _fault_at_commit(*fault) if fault and fault[0] != "kill_after_save" else contextlib.nullcontext():
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()
    except Exception as e:
      if not is_disk_full(e):
        raise
      self._remove_partial(step)
      raise disk_full_error(f"checkpoint {step}", self.directory) from e
    if fault and fault[0] == "kill_after_save":
      os.kill(os.getpid(), signal.SIGKILL)
    return step

  def _remove_partial(self, step: int) -> None:
    """Deletes what a failed save of ``step`` left (its temporary folder); complete checkpoints are not touched."""
    if jax.process_index() != 0:
      return
    for path in glob.glob(os.path.join(self.directory, f"{step}{TMP_SUFFIX}*")):
      shutil.rmtree(path, ignore_errors=True)

  def restore(self, template: dict, step: int | None = None) -> tuple[dict, dict]:
    """(state, meta) of ``step`` (default: latest) shaped and sharded like ``template``.

    The restore target is built from the template's own shapes, dtypes and shardings (not from the saved
    topology), so a checkpoint written on one mesh (say data=2 x fsdp=4) restores onto any other.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint to resume from in {self.directory}")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            template)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                               meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError) as e:
      raise CheckpointError(f"checkpoint {step} in {self.directory} does not fit this config ({e})") from e
    return out["state"], out["meta"]

  def close(self):
    try:
      self.manager.wait_until_finished()
      self.manager.close()
    except Exception as e:  # a save that already failed on a full disk has been reported; do not mask it
      if not is_disk_full(e):
        raise


def check_config_compatible(saved: dict, current: dict) -> None:
  """Raises CheckpointError if a field other than the resumable ones differs from the checkpoint's config."""
  diffs = sorted(k for k in set(saved) | set(current)
                 if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
  if diffs:
    raise CheckpointError(f"the config differs from the checkpoint's in {', '.join(diffs)}; use a new --workdir")


# ------------------------------------------------------------------------------------------------------------------
# Test-only fault injection (HELIOS_FAULT_INJECT, see the module docstring)

_FAULT_ACTIONS = ("kill_during_save", "kill_after_save", "enospc_during_save")


def _fault_for(step: int) -> tuple[str, int] | None:
  """``(action, n)`` when ``HELIOS_FAULT_INJECT`` asks for a fault in the save of ``step``, else None."""
  spec = os.environ.get(FAULT_ENV, "")
  if not spec:
    return None
  parts = spec.split(":")
  if parts[0] not in _FAULT_ACTIONS or len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[1:]):
    raise ValueError(f"{FAULT_ENV}={spec!r}: expected one of {', '.join(_FAULT_ACTIONS)} followed by :STEP[:N]")
  if int(parts[1]) != step:
    return None
  return parts[0], int(parts[2]) if len(parts) == 3 else 1


@contextlib.contextmanager
def _fault_at_commit(action: str, n: int):
  """While active, the ``n``-th commit (``finalize``) of an orbax temporary folder kills the process
  (``kill_during_save``) or fails with ENOSPC (``enospc_during_save``) instead of committing.

  orbax commits each item's folder and then the step's folder through ``TemporaryPath.finalize``; the classes
  patched are orbax internals, so a newer orbax without them makes this (test-only) hook fail loudly.
  """
  from orbax.checkpoint._src.path import atomicity
  classes = [atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath]
  originals = {cls: cls.__dict__["finalize"] for cls in classes}
  calls = [0]

  def patched(original):
    async def finalize(self, *args, **kwargs):
      calls[0] += 1
      if calls[0] == n:
        if action == "kill_during_save":
          os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get()))
      return await original(self, *args, **kwargs)
    return finalize

  for cls in classes:
    cls.finalize = patched(originals[cls])
  try:
    yield
  finally:
    for cls, original in originals.items():
      cls.finalize = original
