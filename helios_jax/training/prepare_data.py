"""Offline preparation of a user's videos for stage-1/2 training (training-spec 3.1), into a tfds dataset.

Input: a folder of videos plus captions as CSV (header ``path,caption``) or JSONL (``{"path":..., "caption":...}``);
relative paths are resolved against the folder. Each video is centre-cropped to the target aspect, resized to
(height, width), split into consecutive ``window``-frame chunks (33 frames -> 9 latents; remainder dropped) and each
chunk is VAE-encoded independently (posterior sample, normalised with the VAE's latents mean/std). Captions become
UMT5 embeddings (max length 512, zero beyond the tokens).

Two phases: (1) ``encode_folder`` writes one ``encoded/NNNNNN.npz`` per video and skips those already present
(resumable), skipping and counting unreadable or too-short videos in ``failures.jsonl``; (2) ``build_dataset``
packs them into a tfds dataset (array_record) that :func:`open_source` reads with random access.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Callable

import numpy as np

from helios_jax.errors import InputError

DATASET_NAME = "helios_latents"


def read_captions(folder: str, captions: str) -> list[tuple[str, str]]:
  """[(video path, caption)] from a CSV or JSONL file."""
  if not os.path.isfile(captions):
    raise InputError(f"captions file not found: {captions}")
  rows = []
  with open(captions, encoding="utf-8") as f:
    if captions.endswith(".jsonl"):
      rows = [json.loads(line) for line in f if line.strip()]
    else:
      rows = list(csv.DictReader(f))
  out = []
  for i, r in enumerate(rows):
    if "path" not in r or "caption" not in r:
      raise InputError(f"captions row {i + 1} of {captions} needs 'path' and 'caption' fields")
    p = r["path"] if os.path.isabs(r["path"]) else os.path.join(folder, r["path"])
    out.append((p, str(r["caption"])))
  return out


def crop_resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 (F, H, W, 3) -> float32 (3, F, height, width) in [-1, 1]: centre crop to the aspect, bilinear resize."""
  from PIL import Image
  f, h, w, _ = frames.shape
  if h * width > w * height:  # too tall
    ch, cw = round(w * height / width), w
  else:
    ch, cw = h, round(h * width / height)
  y0, x0 = (h - ch) // 2, (w - cw) // 2
  out = np.stack([np.asarray(Image.fromarray(fr[y0:y0 + ch, x0:x0 + cw]).resize((width, height), Image.BILINEAR))
                  for fr in frames])
  return (out.astype(np.float32) / 127.5 - 1.0).transpose(3, 0, 1, 2)


def vae_chunk_encoder(vae, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
  """``video (3, n*window, H, W) -> latents (n, z, 1 + (window-1)/4, h, w)``: chunks encoded independently."""
  import jax
  import jax.numpy as jnp
  from helios_jax.models.vae import normalize_latents
  counter = [0]

  def encode(video: np.ndarray, window: int) -> np.ndarray:
    n = video.shape[1] // window
    chunks = video[:, :n * window].reshape(3, n, window, *video.shape[2:]).transpose(1, 0, 2, 3, 4)
    out = []
    for c in chunks:
      dist = vae.encode(jnp.asarray(c[None])).latent_dist
      key = jax.random.fold_in(jax.random.key(seed), counter[0])
      counter[0] += 1
      z = dist.sample(key=key)
      out.append(np.asarray(normalize_latents(z, vae.config.latents_mean, vae.config.latents_std,
                                              jnp.float32))[0])
    return np.stack(out)

  return encode


def umt5_text_encoder(text_encoder, tokenizer, max_length: int = 512) -> Callable[[str], np.ndarray]:
  from helios_jax.models.tokenizer import encode_prompt

  def encode(caption: str) -> np.ndarray:
    return np.asarray(encode_prompt(text_encoder, tokenizer, [caption], max_sequence_length=max_length),
                      np.float32)[0]

  return encode


def encode_folder(items: list[tuple[str, str]], out_dir: str, encode_video: Callable, encode_text: Callable, *,
                  height: int, width: int, window: int = 33, min_chunks: int = 1, progress: bool = True) -> dict:
  """Phase 1: encodes each video to ``out_dir/encoded/NNNNNN.npz``; resumable; returns counts.

  Unreadable or corrupt videos, and videos shorter than ``min_chunks`` windows, are skipped, listed in
  ``out_dir/failures.jsonl`` and counted; they never stop the job.
  """
  from tqdm.auto import tqdm
  from helios_jax.io.media import read_video
  enc_dir = os.path.join(out_dir, "encoded")
  os.makedirs(enc_dir, exist_ok=True)
  fail_path = os.path.join(out_dir, "failures.jsonl")
  counts = dict(encoded=0, skipped_existing=0, failed=0)
  with open(fail_path, "a", encoding="utf-8") as failures:
    for i, (path, caption) in enumerate(tqdm(items, disable=not progress, desc="encode")):
      dst = os.path.join(enc_dir, f"{i:06d}.npz")
      if os.path.exists(dst):
        counts["skipped_existing"] += 1
        continue
      try:
        frames = read_video(path, max_frames=None)
        if frames.shape[0] < window * min_chunks:
          raise InputError(f"{path} has {frames.shape[0]} frames, fewer than {window * min_chunks}")
        video = crop_resize(frames[:(frames.shape[0] // window) * window], height, width)
        latents = encode_video(video, window)
        prompt = encode_text(caption)
      except Exception as e:  # corrupt input: count it and go on
        counts["failed"] += 1
        failures.write(json.dumps(dict(index=i, path=path, error=str(e)[:500])) + "\n")
        failures.flush()
        continue
      tmp = dst + ".tmp.npz"
      np.savez(tmp, latents=latents.astype(np.float32), prompt_embeds=prompt.astype(np.float16),
               caption=np.array(caption), path=np.array(path))
      os.replace(tmp, dst)  # atomic: an interrupted write never leaves a half file
      counts["encoded"] += 1
  return counts


def _builder_class():
  import tensorflow_datasets as tfds

  class HeliosLatents(tfds.core.GeneratorBasedBuilder):
    """Encoded clips: ``latents`` (n_chunks, C, 9, h, w) float32, ``prompt_embeds`` (S, D) float16, caption."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, encoded_dir: str | None = None, shapes: dict | None = None, **kwargs):
      self._encoded_dir = encoded_dir
      self._shapes = shapes or {}
      super().__init__(**kwargs)

    def _info(self):
      s = self._shapes
      lat = tuple([None] + list(s.get("latents", (None, None, None, None))))
      features = tfds.features.FeaturesDict({
          "latents": tfds.features.Tensor(shape=lat, dtype=np.float32),
          "prompt_embeds": tfds.features.Tensor(shape=tuple(s.get("prompt_embeds", (None, None))),
                                                dtype=np.float16),
          "caption": tfds.features.Text(),
      })
      return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for name in sorted(os.listdir(self._encoded_dir)):
        if not name.endswith(".npz") or name.endswith(".tmp.npz"):
          continue
        with np.load(os.path.join(self._encoded_dir, name)) as z:
          yield name, dict(latents=z["latents"], prompt_embeds=z["prompt_embeds"], caption=str(z["caption"]))

  return HeliosLatents


def build_dataset(out_dir: str, data_dir: str) -> str:
  """Phase 2: packs ``out_dir/encoded`` into a tfds array_record dataset under ``data_dir``; returns its path."""
  enc_dir = os.path.join(out_dir, "encoded")
  names = sorted(n for n in os.listdir(enc_dir) if n.endswith(".npz") and not n.endswith(".tmp.npz"))
  if not names:
    raise InputError(f"nothing encoded in {enc_dir}: every video failed (see failures.jsonl)")
  with np.load(os.path.join(enc_dir, names[0])) as z:
    shapes = dict(latents=z["latents"].shape[1:], prompt_embeds=z["prompt_embeds"].shape)
  builder = _builder_class()(encoded_dir=enc_dir, shapes=shapes, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder.data_dir


class _Source:
  def __init__(self, ds):
    self._ds = ds

  def __len__(self):
    return len(self._ds)

  def __getitem__(self, i):
    r = self._ds[int(i)]
    return dict(latents=np.asarray(r["latents"], np.float32), prompt_embeds=np.asarray(r["prompt_embeds"],
                                                                                         np.float32))


def open_source(data_dir: str, name: str = DATASET_NAME):
  """Random-access training source over a prepared dataset (items: ``latents``, ``prompt_embeds``)."""
  import tensorflow_datasets as tfds
  if not data_dir or not os.path.isdir(data_dir):
    raise InputError(f"data.data_dir {data_dir!r} is not a prepared dataset directory")
  builder = tfds.builder_from_directory(_latest_version_dir(data_dir, name))
  return _Source(builder.as_data_source(split="train"))


def _latest_version_dir(data_dir: str, name: str) -> str:
  root = os.path.join(data_dir, name)
  if not os.path.isdir(root):
    raise InputError(f"no dataset {name!r} under {data_dir}")
  versions = sorted(os.listdir(root))
  if not versions:
    raise InputError(f"dataset {root} has no version folder")
  return os.path.join(root, versions[-1])


def main(argv=None) -> int:
  """CLI: ``python -m helios_jax.training.prepare_data --videos DIR --captions FILE --model HELIOS_DIR --out DIR``."""
  import argparse
  import jax.numpy as jnp
  from helios_jax.errors import HeliosError
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--videos", required=True, help="folder of the videos (relative caption paths start here)")
  p.add_argument("--captions", required=True, help="CSV (path,caption) or JSONL")
  p.add_argument("--model", required=True, help="Helios/Wan pipeline folder with vae/, text_encoder/, tokenizer/")
  p.add_argument("--out", required=True, help="work folder: encoded/, failures.jsonl, tfds/")
  p.add_argument("--height", type=int, default=384)
  p.add_argument("--width", type=int, default=640)
  p.add_argument("--window", type=int, default=33)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  try:
    from helios_jax.models.tokenizer import load_tokenizer
    from helios_jax.models.umt5 import UMT5EncoderModel
    from helios_jax.models.vae import AutoencoderKLWan
    vae = AutoencoderKLWan.from_pretrained(os.path.join(a.model, "vae"), dtype=jnp.float32)
    te = UMT5EncoderModel.from_pretrained(os.path.join(a.model, "text_encoder"), dtype=jnp.bfloat16)
    tok = load_tokenizer(os.path.join(a.model, "tokenizer"))
    items = read_captions(a.videos, a.captions)
    counts = encode_folder(items, a.out, vae_chunk_encoder(vae, a.seed), umt5_text_encoder(te, tok),
                           height=a.height, width=a.width, window=a.window)
    path = build_dataset(a.out, os.path.join(a.out, "tfds"))
  except HeliosError as e:
    print(f"error: {e}")
    return 1
  print(f"{counts}; dataset at {path}; train with --config.data.source=tfds "
        f"--config.data.data_dir={os.path.join(a.out, 'tfds')}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
