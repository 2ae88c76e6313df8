"""orbax-checkpoint saving and resuming of the train state (trainables, optimiser state, step, RNG, data position).

Layout: ``WORKDIR/checkpoints/<step>/{state,meta}``. ``meta`` is JSON: the step (= data position, see
``helios_jax.training.data``), the seed and the config, checked on resume so a changed config is not silently mixed.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from helios_jax.errors import CheckpointError

# Fields that may change between an interrupted run and its resumption.
# ``mesh``: a run saved on one mesh resumes on another (orbax reshards into the template's shardings);
# ``offload`` (stage 3): where arrays live between phases, also taken from the template on restore.
RESUMABLE_CHANGES = ("total_steps", "checkpoint", "log_every", "export_merged", "mesh", "offload")


class Checkpointer:
  """Keeps the last ``keep`` checkpoints under ``WORKDIR/checkpoints``."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True, enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: dict, meta: dict) -> int:
    step = int(jax.device_get(state["step"]))
    if step in self.manager.all_steps():
      return step
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()
    return step

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
    self.manager.wait_until_finished()
    self.manager.close()


def check_config_compatible(saved: dict, current: dict) -> None:
  """Raises CheckpointError if a field other than the resumable ones differs from the checkpoint's config."""
  diffs = sorted(k for k in set(saved) | set(current)
                 if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
  if diffs:
    raise CheckpointError(f"the config differs from the checkpoint's in {', '.join(diffs)}; use a new --workdir")
