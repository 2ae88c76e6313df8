"""Stage 3 phase 5: ODE-pair data from the teacher and ODE regression of the few-step student (training-spec 7.4).

Data. For each prompt the teacher (the frozen base itself: Helios-Mid, LoRA off) generates ``num_sections``
chunks autoregressively (its own outputs form the history) with the pyramid sampler: per stage an Euler flow
integration with CFG over the union of a ``teacher_steps``-step grid and the student's timesteps (the
:func:`helios_jax.training.ahd.rollout_schedule` of the distilled sampler, amplified for the first chunk), so the
latent at every student timestep is recorded exactly; the stage end point is the last entry. Stages are joined
with the student's own upsample + block-noise renoise. (The reference uses UniPC with the student timesteps
inserted; a multistep solver's state makes "record at inserted points" awkward, Euler on the same grid does not.)

Format (``ode.pairs_format``). Generation always writes one ``.npz`` per prompt into ``ode.data_dir``
(``pair_00000.npz``, atomic per prompt, so an interrupted generation resumes): ``prompt_embeds`` (S, D) and per
section k and stage i ``s{k}_p{i}_latents`` (n+1, C, T, h_i, w_i), ``s{k}_p{i}_timesteps`` (n,),
``s{k}_p{i}_sigmas`` (n,). The shapes differ across keys (4 vs 2 steps, three resolutions per section) but are
fixed per key for a config, so the same record is also a tfds example (``helios_ode_pairs``: one example per
prompt, a FeaturesDict of fixed-shape ``Tensor`` features with those keys, array_record, read with random access).
  - ``"npz"`` (default): training reads the npz folder; needs nothing but NumPy. Use it where
    tensorflow-datasets is not installed (the GPU machine).
  - ``"tfds"``: once the folder holds ``num_prompts`` pairs they are packed into the tfds dataset under
    ``ode.tfds_dir`` (default ``<data_dir>/tfds``) and training reads that; an existing dataset with enough examples
    is used as it is (the npz files may be gone). Use it to keep the pairs as one tfds dataset like the stage-1/2
    data (:mod:`helios_jax.training.prepare_data`). Pairs generated without tfds are packed later with
    :func:`convert_pairs` (``python -m helios_jax.training.ode --convert <npz folder>``).
Both read the same float32 arrays in the same order (sorted file names), so the batches and the loss are identical.

Training (spec 7.4; the trainer is :mod:`helios_jax.training.trainers.ode`): per step pick ``sections_per_step``
sorted sections; for each and each stage a random recorded latent z_j at t_j; loss ``weight * mean_terms 0.5 mean((z_j - s_j G(z_j, t_j) - end)^2)`` with the history
built from the teacher's final chunks (anchor = first latent of chunk 0). No corruption, no drops.

Mesh (``config.mesh``): the frozen base, trainables, optimiser state and EMA are split by the FSDP rule and the
step is jitted with declared shardings (:meth:`helios_jax.parallel.layout.TrainLayout.jit_step`); pair generation
and training run under ``jax.set_mesh`` (sequence-parallel attention with ``mesh.sequence > 1``). A step's batch
is one prompt (``batch_size`` is not used), so it is replicated: ``fsdp`` saves memory, ``data`` adds nothing.
"""

from __future__ import annotations

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax.errors import InputError
from helios_jax.pipelines.history import downsample_2x, upsample_nearest_2x
from helios_jax.schedulers.dmd import HeliosDMDScheduler
from helios_jax.schedulers.helios import calculate_shift
from helios_jax.training import ahd, data, losses
from helios_jax.training.sources import make_source

HISTORY = data.HISTORY_FRAMES


def teacher_grid(student_sigmas: np.ndarray, teacher_steps: int, stage: int, seq_len: int, n_stages: int) -> tuple:
  """(sigmas (m+1,) descending ending at 0, indices of the student's sigmas in it) for one pyramid stage."""
  sched = HeliosDMDScheduler.from_config(dict(stages=n_stages, use_dynamic_shifting=True, time_shift_type="linear"))
  tab = sched.set_timesteps(teacher_steps, stage_index=stage, mu=calculate_shift(seq_len))
  grid = np.sort(np.concatenate([np.asarray(tab.sigmas, np.float64), student_sigmas.astype(np.float64), [0.0]]))[::-1]
  grid = grid[np.concatenate([[True], np.diff(grid) < -1e-5])]  # merge points closer than float32 rounding
  where = np.array([int(np.argmin(np.abs(grid - s))) for s in student_sigmas])
  return grid.astype(np.float32), where


def stage_timestep(sigma, stage: int, n_stages: int):
  """Network timestep of a local (shifted) sigma in pyramid stage ``stage``: ``t_min + s (t_max - t_min)``."""
  ts = np.asarray(HeliosDMDScheduler.from_config(dict(stages=n_stages)).geometry.timesteps_per_stage[stage], np.float64)
  t_max, t_min = ts[0], ts[-1] - (ts[0] - ts[1])  # the table is linspace(t_max, t_min, 1001)[:-1]
  return t_min + sigma * (t_max - t_min)


def generate_pairs(forward, prompt_embeds: np.ndarray, negative: np.ndarray, shape: tuple, cfg, key) -> dict:
  """One prompt's ODE record (see module doc). ``shape`` = (C, T, H, W) of one chunk; eager host loop over
  sections and stages, one jitted Euler integration per stage."""
  o = cfg.ode
  n_stages = int(cfg.objective.pyramid_stages)
  c, t, h, w = shape
  out = {"prompt_embeds": np.asarray(prompt_embeds, np.float32)}
  prompt = jnp.asarray(prompt_embeds, jnp.float32)[None]
  neg = jnp.asarray(negative, jnp.float32)[None]
  indices = {k: jnp.asarray(v) for k, v in losses.history_indices(t).items()}
  hist20 = jnp.zeros((1, c, 1 + HISTORY, h, w), jnp.float32)
  for k in range(int(o.num_sections)):
    sched = ahd.rollout_schedule(tuple(cfg.dmd.rollout_steps), (h, w), t, amplify=k == 0,
                                 gamma=float(cfg.objective.pyramid_gamma))
    key, k_roll = jax.random.split(key)
    draws = ahd.draw_rollout(k_roll, (1, c, t, h, w), sched)
    cond = dict(history=losses.split_history(hist20), prompt=prompt, negative=neg, indices=indices)
    z = draws["noise"]
    for _ in range(n_stages - 1):
      z = downsample_2x(z)
    for i in range(n_stages):
      if i > 0:
        z = sched.alpha[i] * upsample_nearest_2x(z) + sched.beta[i] * draws["block_noise"][i - 1]
      f = 2 ** (n_stages - 1 - i)
      grid, where = teacher_grid(sched.step_sigma[i], int(o.teacher_steps), i, t * (h // f) * (w // f) // 4, n_stages)
      ts = stage_timestep(grid[:-1].astype(np.float64), i, n_stages)
      ts[where] = sched.timesteps[i]  # the student's exact timesteps at its own points
      ts = ts.astype(np.float32)
      traj = _euler(forward, z, jnp.asarray(grid), jnp.asarray(ts), cond, float(o.teacher_guidance))
      traj = np.asarray(traj)
      out[f"s{k}_p{i}_latents"] = np.concatenate([traj[where], traj[-1:]], axis=0)[:, 0]
      out[f"s{k}_p{i}_timesteps"] = np.asarray(sched.timesteps[i], np.float32)
      out[f"s{k}_p{i}_sigmas"] = np.asarray(sched.step_sigma[i], np.float32)
      z = jnp.asarray(traj[-1])
    final = z
    if k == 0:
      hist20 = hist20.at[:, :, :1].set(final[:, :, :1])
    buf = jnp.concatenate([hist20[:, :, 1:], final], axis=2)[:, :, -HISTORY:]
    hist20 = jnp.concatenate([hist20[:, :, :1], buf], axis=2)
  return out


@jax.jit
def _euler_jit(graph_and_state, z, grid, ts, cond, guidance):
  graphdef, state = graph_and_state
  forward = nnx.merge(graphdef, state).forward

  def body(zz, xs):
    s, s_next, t = xs
    v_c = ahd.call_model(forward, zz, t, cond).astype(jnp.float32)
    v_u = ahd.call_model(forward, zz, t, cond, prompt_key="negative").astype(jnp.float32)
    v = v_u + guidance * (v_c - v_u)
    nz = zz + (s_next - s) * v
    return nz, nz

  _, traj = jax.lax.scan(body, z, (grid[:-1], grid[1:], ts))
  return jnp.concatenate([z[None], traj], axis=0)


def _euler(model_parts, z, grid, ts, cond, guidance):
  """(m+1, B, C, T, h, w) latents before every step and the final one."""
  return _euler_jit(model_parts, z, grid, ts, cond, jnp.float32(guidance))


def write_pairs(folder: str, index: int, record: dict) -> str:
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"pair_{index:05d}.npz")
  tmp = path + ".tmp.npz"
  np.savez(tmp, **record)
  os.replace(tmp, path)
  return path


def list_pairs(folder: str) -> list[str]:
  """Sorted ``pair_*.npz`` of ``folder``, without the ``*.tmp.npz`` an interrupted :func:`write_pairs` leaves."""
  return sorted(p for p in glob.glob(os.path.join(folder, "pair_*.npz")) if not p.endswith(".tmp.npz"))


# ---------------------------------------------------------------------------------------------------------------
# tfds storage of the pairs

PAIRS_FORMATS = ("npz", "tfds")
DATASET_NAME = "helios_ode_pairs"


def _tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise InputError("ode.pairs_format='tfds' needs tensorflow-datasets, which cannot be imported here "
                     f"({e}); use ode.pairs_format='npz' on this machine and pack the pair folder later with "
                     "`python -m helios_jax.training.ode --convert <folder>` where tfds is installed") from e
  return tfds


def pair_shapes(path: str) -> dict:
  """{key: shape} of one pair file (all float32)."""
  with np.load(path) as z:
    return {k: tuple(z[k].shape) for k in z.files}


def _builder_class():
  tfds = _tfds()

  class HeliosOdePairs(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # one class per call
    """ODE pairs (see :mod:`helios_jax.training.ode`): one example per prompt, every key a fixed-shape float32
    ``Tensor`` (``prompt_embeds`` (S, D), ``s{k}_p{i}_latents`` (n+1, C, T, h_i, w_i), ``_timesteps``/``_sigmas``
    (n,))."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, files: list[str] | None = None, shapes: dict | None = None, **kwargs):
      self._files = files or []
      self._shapes = shapes or {}
      super().__init__(**kwargs)

    def _info(self):
      features = tfds.features.FeaturesDict({
          # raw bytes: exact float32 and compact for the large latent tensors
          k: tfds.features.Tensor(shape=s, dtype=np.float32, encoding=tfds.features.Encoding.BYTES)
          for k, s in sorted(self._shapes.items())})
      return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for path in self._files:
        with np.load(path) as z:
          rec = {k: np.asarray(z[k], np.float32) for k in z.files}
        got = {k: v.shape for k, v in rec.items()}
        if got != self._shapes:
          raise InputError(f"{path} does not match the other pairs (keys/shapes {got} vs {self._shapes}): "
                           "pairs from different configs in one folder?")
        yield os.path.basename(path), rec

  return HeliosOdePairs


def convert_pairs(folder: str, tfds_dir: str = "") -> str:
  """Packs the ``pair_*.npz`` of ``folder`` (in sorted order) into the tfds dataset ``helios_ode_pairs`` under
  ``tfds_dir`` (default ``<folder>/tfds``), replacing an existing one; returns the dataset's version folder."""
  tfds = _tfds()
  files = list_pairs(folder)
  if not files:
    raise InputError(f"no pair_*.npz in {folder!r}")
  builder = _builder_class()(files=files, shapes=pair_shapes(files[0]), data_dir=tfds_dir or
                             os.path.join(folder, "tfds"), file_format="array_record")
  mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD  # rebuild: an older dataset may hold fewer prompts
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
  return builder.data_dir


def open_pairs(tfds_dir: str):
  """Random-access sequence of pair records (dicts of float32 arrays, same order as the npz files) from the
  ``helios_ode_pairs`` dataset under ``tfds_dir``."""
  from helios_jax.training.prepare_data import _latest_version_dir  # lazily, as the stage-1/2 tfds reader
  tfds = _tfds()
  if not tfds_dir or not os.path.isdir(tfds_dir):
    raise InputError(f"ode.tfds_dir {tfds_dir!r} is not a folder with a {DATASET_NAME} dataset")
  builder = tfds.builder_from_directory(_latest_version_dir(tfds_dir, DATASET_NAME))
  return builder.as_data_source(split="train")


def _pairs_tfds_dir(o) -> str:
  return o.get("tfds_dir", "") or os.path.join(o.data_dir, "tfds")


def _existing_tfds(tfds_dir: str):
  """The dataset under ``tfds_dir``, or None where none was prepared."""
  if not os.path.isdir(os.path.join(tfds_dir, DATASET_NAME)):
    return None
  try:
    return open_pairs(tfds_dir)
  except InputError:
    return None


def ensure_pairs(config, graphdef, frozen, negative: np.ndarray):
  """The ODE pairs of ``config.ode`` as a sequence (npz paths, or tfds records with ``pairs_format='tfds'``);
  missing ones (up to ``ode.num_prompts``) are generated from the prompts of ``config.data`` with the frozen base as
  teacher (resumable: existing files are kept) and, for tfds, then packed (see module doc)."""
  o = config.ode
  fmt = o.get("pairs_format", "npz")
  if fmt not in PAIRS_FORMATS:
    raise InputError(f"ode.pairs_format {fmt!r} is not one of {PAIRS_FORMATS}")
  folder = o.data_dir
  need = int(o.num_prompts)
  if fmt == "tfds":
    _tfds()  # fail before generating anything
    if not folder and not o.get("tfds_dir", ""):
      raise InputError("ode.data_dir and ode.tfds_dir are empty: set a folder for the ODE pairs")
    ds = _existing_tfds(_pairs_tfds_dir(o))
    if ds is not None and len(ds) >= need:
      return ds
  if not folder:
    raise InputError("ode.data_dir is empty: set a folder for the ODE pairs")
  have = list_pairs(folder)
  if len(have) < need:
    source = make_source(config)
    d = config.data
    shape = (int(d.channels), 9, int(d.height), int(d.width))
    for i in range(need):
      path = os.path.join(folder, f"pair_{i:05d}.npz")
      if os.path.exists(path):
        continue
      prompt = np.asarray(source[i % len(source)]["prompt_embeds"], np.float32)
      rec = generate_pairs((graphdef, frozen), prompt, negative, shape, config, jax.random.key(int(o.seed)))
      write_pairs(folder, i, rec)
    have = list_pairs(folder)
  if fmt == "npz":
    return have
  convert_pairs(folder, _pairs_tfds_dir(o))
  return open_pairs(_pairs_tfds_dir(o))


# ---------------------------------------------------------------------------------------------------------------
# ODE regression

def ode_batch(pairs, step: int, cfg) -> dict:
  """Host-side draw for step ``step`` (pure function of the pairs, seed and step): the selected sections' stage
  latents, timesteps, sigmas, end points and histories, all with a leading batch axis of 1. ``pairs``: a sequence
  of npz paths (:func:`list_pairs`) or of records (:func:`open_pairs`)."""
  _, idx = data.sample_index(step, len(pairs), int(cfg.data.seed))
  item = pairs[idx]
  if isinstance(item, (str, os.PathLike)):
    with np.load(item) as rec:
      return _draw(rec, step, cfg)
  return _draw(item, step, cfg)


def _draw(rec, step: int, cfg) -> dict:
  """:func:`ode_batch` on one record (an open npz or a dict of arrays)."""
  o = cfg.ode
  n_sec = int(o.num_sections)
  n_stages = int(cfg.objective.pyramid_stages)
  rng = np.random.default_rng([int(cfg.seed), int(step)])
  chosen = sorted(rng.choice(n_sec, size=int(o.sections_per_step), replace=False).tolist())
  finals = [rec[f"s{k}_p{n_stages - 1}_latents"][-1] for k in range(n_sec)]
  c, t, h, w = finals[0].shape
  hist20 = np.zeros((c, 1 + HISTORY, h, w), np.float32)
  out = {"prompt_embeds": rec["prompt_embeds"][None]}
  for k in range(n_sec):
    if k in chosen:
      n = chosen.index(k)
      out[f"hist{n}"] = hist20[None].copy()
      for i in range(n_stages):
        lat = rec[f"s{k}_p{i}_latents"]
        j = int(rng.integers(lat.shape[0] - 1))
        out[f"z{n}_{i}"] = lat[j][None]
        out[f"end{n}_{i}"] = lat[-1][None]
        out[f"t{n}_{i}"] = rec[f"s{k}_p{i}_timesteps"][j:j + 1]
        out[f"s{n}_{i}"] = rec[f"s{k}_p{i}_sigmas"][j:j + 1]
    if k == 0:
      hist20[:, :1] = finals[0][:, :1]
    hist20[:, 1:] = np.concatenate([hist20[:, 1:], finals[k]], axis=1)[:, -HISTORY:]
  return out


def ode_loss(forward, batch: dict, cfg) -> jax.Array:
  """``weight * mean over (section, stage) of 0.5 mean((x0_hat - end)^2)`` (spec 7.4)."""
  n_stages = int(cfg.objective.pyramid_stages)
  t = batch["z0_0"].shape[2]
  indices = {k: jnp.asarray(v) for k, v in losses.history_indices(t).items()}
  terms = []
  for n in range(int(cfg.ode.sections_per_step)):
    cond = dict(history=losses.split_history(batch[f"hist{n}"]), prompt=batch["prompt_embeds"], indices=indices)
    for i in range(n_stages):
      z, s = batch[f"z{n}_{i}"], batch[f"s{n}_{i}"]
      v = ahd.call_model(forward, z, batch[f"t{n}_{i}"], cond)
      x0 = z - s[:, None, None, None, None] * v.astype(jnp.float32)
      terms.append(0.5 * jnp.mean(jnp.square(x0 - batch[f"end{n}_{i}"])))
  return float(cfg.ode.regression_weight) * sum(terms) / len(terms)


def main(argv=None) -> int:
  """CLI: ``python -m helios_jax.training.ode --convert PAIR_FOLDER [--tfds-dir DIR]`` packs npz pairs into tfds."""
  import argparse
  from helios_jax.errors import HeliosError
  p = argparse.ArgumentParser(description="Pack a folder of ODE-pair npz files into the helios_ode_pairs tfds dataset")
  p.add_argument("--convert", required=True, help="folder of pair_*.npz (ode.data_dir)")
  p.add_argument("--tfds-dir", default="", help="tfds data_dir (default <folder>/tfds, what ode.tfds_dir='' reads)")
  a = p.parse_args(argv)
  try:
    path = convert_pairs(a.convert, a.tfds_dir)
  except HeliosError as e:
    print(f"error: {e}")
    return 1
  print(f"dataset at {path}; train with --config.ode.pairs_format=tfds --config.ode.data_dir={a.convert}"
        + (f" --config.ode.tfds_dir={a.tfds_dir}" if a.tfds_dir else ""))
  return 0


def __getattr__(name):
  if name == "train":  # the trainer left this module (it imported the other trainers: an import circle)
    raise AttributeError("helios_jax.training.ode.train moved to helios_jax.training.trainers.ode.train "
                         "(or helios_jax.training.dispatch.train, which picks the trainer by config.stage)")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
  raise SystemExit(main())
