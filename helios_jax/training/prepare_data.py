"""Offline preparation of a user's videos for stage-1/2 training (training-spec 3.1), into a tfds dataset.

Input: a folder of videos plus captions as CSV (header ``path,caption``) or JSONL (``{"path":..., "caption":...}``);
relative paths are resolved against the folder. Each video is centre-cropped to the target aspect, resized to
(height, width), split into consecutive ``window``-frame chunks (33 frames -> 9 latents; remainder dropped) and each
chunk is VAE-encoded independently (posterior sample, normalised with the VAE's latents mean/std). Captions become
UMT5 embeddings (max length 512, zero beyond the tokens).

Two phases: (1) ``encode_folder`` writes one ``encoded/NNNNNN.npz`` per video and skips those already present
(resumable), skipping and counting unreadable or too-short videos in ``failures.jsonl``; (2) ``build_dataset``
packs them into a tfds dataset (array_record) that :func:`open_source` reads with random access.

Faults (docs/reliability.md): missing, zero-byte, corrupt and too-short videos and captions that are not UTF-8 are
skipped and counted by reason in ``report.json`` (and listed in ``failures.jsonl``); they never stop the job. Each
``.npz`` is written to a temporary name and renamed, and each video's VAE noise comes from its row index (not from
how many videos this process encoded), so a run stopped at any point (SIGTERM finishes the current video and
exits 143; a kill loses it) and run again gives the same dataset as one uninterrupted run. A full disk stops the
job with one :class:`~helios_jax.errors.DiskFullError` naming the path and the free space.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import os
import signal
import threading
from typing import Callable

import numpy as np

from helios_jax.errors import HeliosError, InputError
from helios_jax.io.disk_space import disk_full_error, is_disk_full

DATASET_NAME = "helios_latents"
REPORT_NAME = "report.json"
# Why a video is skipped (the keys of report.json's "skipped")
REASONS = ("missing", "empty", "caption_not_utf8", "corrupt", "too_short", "encode_failed")


def _has_surrogates(text: str) -> bool:
  """True when ``text`` holds bytes that were not UTF-8 (decoded with ``surrogateescape``)."""
  return any("\udc80" <= ch <= "\udcff" for ch in text)


def read_captions(folder: str, captions: str) -> list[tuple[str, str | None]]:
  """[(video path, caption)] from a CSV or JSONL file; the caption is None where its bytes are not UTF-8 (the
  row stays, so row indices and output names do not depend on which captions are readable)."""
  if not os.path.isfile(captions):
    raise InputError(f"captions file not found: {captions}")
  with open(captions, "rb") as f:
    text = f.read().decode("utf-8", errors="surrogateescape")
  if captions.endswith(".jsonl"):
    rows = []
    for n, line in enumerate(text.splitlines()):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except ValueError as e:
        raise InputError(f"line {n + 1} of {captions} is not JSON ({e})") from None
  else:
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
  out = []
  for i, r in enumerate(rows):
    if not isinstance(r, dict) or "path" not in r or "caption" not in r:
      raise InputError(f"captions row {i + 1} of {captions} needs 'path' and 'caption' fields")
    p = str(r["path"])
    p = p if os.path.isabs(p) else os.path.join(folder, p)
    caption = str(r["caption"])
    out.append((p, None if _has_surrogates(caption) else caption))
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
  """``encode(video (3, n*window, H, W), window, index) -> latents (n, z, 1 + (window-1)/4, h, w)``: chunks encoded
  independently, chunk ``j`` of row ``index`` sampled with key ``fold_in(fold_in(key(seed), index), j)``, so a video's
  latents do not depend on what else this process encoded (an interrupted and resumed job equals one run)."""
  import jax
  import jax.numpy as jnp
  from helios_jax.models.vae import normalize_latents

  def encode(video: np.ndarray, window: int, index: int = 0) -> np.ndarray:
    n = video.shape[1] // window
    chunks = video[:, :n * window].reshape(3, n, window, *video.shape[2:]).transpose(1, 0, 2, 3, 4)
    out = []
    for j, c in enumerate(chunks):
      dist = vae.encode(jnp.asarray(c[None])).latent_dist
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), int(index)), j)
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


class _Skip(Exception):
  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason


def _load_clip(path: str, caption: str | None, window: int, min_chunks: int, height: int, width: int) -> np.ndarray:
  """The (3, n*window, height, width) video of one row, or :class:`_Skip` with the reason it cannot be used."""
  from helios_jax.io.media import read_video
  if caption is None:
    raise _Skip("caption_not_utf8", "the caption is not valid UTF-8")
  if not os.path.exists(path):
    raise _Skip("missing", "the file does not exist")
  if os.path.isfile(path) and os.path.getsize(path) == 0:
    raise _Skip("empty", "the file is empty (0 bytes)")
  try:
    frames = read_video(path, max_frames=None)
  except Exception as e:  # any decoder failure: a corrupt or unsupported file
    raise _Skip("corrupt", str(e)) from None
  if frames.shape[0] < window * min_chunks:
    raise _Skip("too_short", f"{frames.shape[0]} frames, fewer than {window * min_chunks}")
  return crop_resize(frames[:(frames.shape[0] // window) * window], height, width)


def _write_atomic(dst: str, write: Callable[[str], None], what: str) -> None:
  """``write(tmp)`` then rename to ``dst``; on a full disk the partial file is removed and DiskFullError raised."""
  tmp = dst + ".tmp" + os.path.splitext(dst)[1]
  try:
    write(tmp)
    os.replace(tmp, dst)  # atomic: an interrupted write never leaves a half file under the final name
  except Exception as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if is_disk_full(e):
      raise disk_full_error(what, os.path.dirname(dst)) from e
    raise


def encode_folder(items: list[tuple[str, str | None]], out_dir: str, encode_video: Callable, encode_text: Callable,
                  *, height: int, width: int, window: int = 33, min_chunks: int = 1, progress: bool = True,
                  should_stop: Callable[[], bool] | None = None) -> dict:
  """Phase 1: encodes row ``i`` to ``out_dir/encoded/{i:06d}.npz`` (skipping rows already there); returns counts
  ``dict(encoded, skipped_existing, failed)``.

  ``encode_video(video, window, index=i)`` (see :func:`vae_chunk_encoder`), ``encode_text(caption)``. Rows that
  cannot be used (:data:`REASONS`) are skipped, never stop the job, and are listed in ``out_dir/failures.jsonl``
  and counted by reason in ``out_dir/report.json`` (both rewritten by every run, so a rerun lists each once).
  ``should_stop()`` is asked between rows (the CLI's SIGTERM handler); the report then says ``interrupted``.
  """
  from tqdm.auto import tqdm
  enc_dir = os.path.join(out_dir, "encoded")
  os.makedirs(enc_dir, exist_ok=True)
  counts = dict(encoded=0, skipped_existing=0, failed=0)
  skipped, interrupted = [], False
  with open(os.path.join(out_dir, "failures.jsonl"), "w", encoding="utf-8", errors="surrogateescape") as failures:
    for i, (path, caption) in enumerate(tqdm(items, disable=not progress, desc="encode")):
      if should_stop is not None and should_stop():
        interrupted = True
        break
      dst = os.path.join(enc_dir, f"{i:06d}.npz")
      if os.path.exists(dst):
        counts["skipped_existing"] += 1
        continue
      try:
        video = _load_clip(path, caption, window, min_chunks, height, width)
        try:
          latents = encode_video(video, window, index=i)
          prompt = encode_text(caption)
        except Exception as e:
          if is_disk_full(e) or isinstance(e, HeliosError):
            raise
          raise _Skip("encode_failed", str(e)) from None
      except _Skip as e:  # unusable input: count it and go on
        counts["failed"] += 1
        entry = dict(index=i, path=path, reason=e.reason, error=str(e)[:500])
        skipped.append(entry)
        failures.write(json.dumps(entry) + "\n")
        failures.flush()
        continue
      _write_atomic(dst, lambda tmp: np.savez(tmp, latents=latents.astype(np.float32),
                                              prompt_embeds=prompt.astype(np.float16), caption=np.array(caption),
                                              path=np.array(path)), f"encoded clip {i}")
      counts["encoded"] += 1
  _write_report(out_dir, len(items), counts, skipped, interrupted)
  return counts


def _write_report(out_dir: str, total: int, counts: dict, skipped: list[dict], interrupted: bool) -> None:
  by_reason = {r: sum(1 for s in skipped if s["reason"] == r) for r in REASONS}
  report = dict(rows=total, encoded=counts["encoded"] + counts["skipped_existing"],
                encoded_this_run=counts["encoded"], skipped=by_reason, skipped_total=len(skipped),
                skipped_rows=skipped, interrupted=interrupted)
  path = os.path.join(out_dir, REPORT_NAME)

  def write(tmp):
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
      json.dump(report, f, indent=2, ensure_ascii=True)
  _write_atomic(path, write, "the preparation report")


class _StopOnSignal:
  """SIGTERM / SIGINT set a flag that :func:`encode_folder` checks between videos (main thread only)."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGTERM, signal.SIGINT):
        self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signum = signum

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


def prepare(items: list[tuple[str, str | None]], out_dir: str, encode_video: Callable, encode_text: Callable, *,
            height: int, width: int, window: int = 33, min_chunks: int = 1, progress: bool = True,
            data_dir: str | None = None) -> tuple[dict, str | None, int | None]:
  """Both phases under a SIGTERM/SIGINT handler: returns ``(counts, dataset path or None, signal number or None)``.
  A signal finishes the current video, writes the report and skips phase 2 (rerun the same command to go on)."""
  with _StopOnSignal() as stop:
    counts = encode_folder(items, out_dir, encode_video, encode_text, height=height, width=width, window=window,
                           min_chunks=min_chunks, progress=progress, should_stop=lambda: stop.signum is not None)
    if stop.signum is not None:
      return counts, None, stop.signum
    path = build_dataset(out_dir, data_dir or os.path.join(out_dir, "tfds"))
  return counts, path, stop.signum


@functools.lru_cache(maxsize=None)  # tfds registers builder classes by name: define it once per process
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
  try:
    builder.download_and_prepare()
  except Exception as e:
    if is_disk_full(e):
      raise disk_full_error("the tfds dataset shards", data_dir) from e
    raise
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
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--videos", required=True, help="folder of the videos (relative caption paths start here)")
  p.add_argument("--captions", required=True, help="CSV (path,caption) or JSONL")
  p.add_argument("--model", required=True, help="Helios/Wan pipeline folder with vae/, text_encoder/, tokenizer/")
  p.add_argument("--out", required=True, help="work folder: encoded/, report.json, failures.jsonl, tfds/")
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
    counts, path, signum = prepare(items, a.out, vae_chunk_encoder(vae, a.seed), umt5_text_encoder(te, tok),
                                   height=a.height, width=a.width, window=a.window)
  except HeliosError as e:
    print(f"error: {e}")
    return 1
  if signum is not None:
    print(f"{counts}; stopped by {signal.Signals(signum).name}: run the same command to go on "
          f"(report: {os.path.join(a.out, REPORT_NAME)})")
    return 128 + signum  # the shell's convention for a process ended by a signal
  print(f"{counts}; dataset at {path}; train with --config.data.source=tfds "
        f"--config.data.data_dir={os.path.join(a.out, 'tfds')}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
