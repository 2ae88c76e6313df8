"""Pieces of the bundled demo model: its tokenizer and frozen text encoder, the encoded scene dataset that
``train.py`` reads (``data.source = "demo"``), and the diffusers-layout pipeline folders.

Text side: a UMT5-architecture encoder (2 layers, width 64) with *random, frozen* weights (seeded) and a word-level
SentencePiece-style (Unigram) ``tokenizer.json`` whose vocabulary is every word a scene caption can hold plus single
letters (other lower-case words fall back to letters). A random encoder is enough here: captions are a small
closed language and the DiT's cross-attention learns to read the fixed embeddings. Both are written as the usual
``text_encoder/`` and ``tokenizer/`` folders, so the pipelines load them like UMT5-XXL's.

Dataset: scene ``i`` of stream ``seed`` is rendered for ``num_chunks`` consecutive 33-frame windows; each window is
VAE-encoded independently (normalised with the VAE's latents mean / std) as
:mod:`helios_jax.training.prepare_data` encodes real videos, and each caption is embedded once. The folder holds
``latents.npy`` (N, n_chunks, z, 9, h, w) float16, ``caption_index.npy`` (N,), ``embeds.npy`` (U, L, D) float16 for
the U distinct captions, ``captions.json`` and ``meta.json`` (``posterior`` records which latent was stored).

Posterior mean, not a sample (``posterior="mean"``, the default): the demo VAE is trained with a tiny KL weight
(``configs/demo_vae.py``), and its posterior std is not small against the spread of the means. Measured on the
first bundled VAE (8 held-out windows): in normalised units the posterior variance averages 0.24 of a total 1.0,
and on some channels the std exceeds the std of the means (channel 0: 0.90 vs 0.33 before normalisation). Each
sampled latent then carries fresh, unpredictable per-element noise, independently drawn for every window, so
(a) the flow-matching loss has an irreducible floor of about 0.64 (of the 0.80 the first Base plateaued at:
``E_s[a / ((1 - s)^2 a + s^2)]`` over the logit-normal ``s`` for posterior variance ``a``), which buries the
part a model can learn, and (b) the history frames are noisy copies that predict the target's noise not at all.
The Base then learned to ignore its history (``recipes/demo/demo_conditioning.py``). The mean is a deterministic
function of the pixels, so static backgrounds and slowly moving shapes are predictable across chunks.
``posterior="sample"`` keeps the old behaviour (what the real Helios data pipeline does with the Wan VAE, whose
posterior is far narrower).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax.errors import InputError
from recipes.demo import scenes

WINDOW = 33  # video frames per chunk (9 latents)
MAX_SEQUENCE_LENGTH = 512  # what sample.py and the pipelines use
TEXT_ENCODER_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2)
_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5 / UMT5
_LETTER_SCORE = -20.0  # letters only win where no whole-word piece matches


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and text encoder


def tokenizer_json(words) -> dict:
  """A Unigram ``tokenizer.json`` over ``"\u2581" + word`` pieces (ids 3..) and single-letter fallbacks."""
  pieces = [[s, 0.0] for s in _SPECIALS]
  pieces += [["\u2581" + w, -1.0] for w in words]
  pieces += [["\u2581", _LETTER_SCORE]] + [[chr(c), _LETTER_SCORE] for c in range(ord("a"), ord("z") + 1)]
  added = [dict(id=i, content=s, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
           for i, s in enumerate(_SPECIALS)]
  return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
          "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True},
          "post_processor": None,
          "decoder": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True},
          "model": {"type": "Unigram", "unk_id": 2, "vocab": pieces, "byte_fallback": False}}


def write_tokenizer(folder: str, words=None) -> int:
  """Writes ``tokenizer/`` (tokenizer.json, tokenizer_config.json, special_tokens_map.json); returns the vocab size."""
  words = scenes.vocabulary() if words is None else list(words)
  os.makedirs(folder, exist_ok=True)
  spec = tokenizer_json(words)
  with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
    json.dump(spec, f, indent=1)
  special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
  with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
    json.dump(special, f, indent=2)
  with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "legacy": True, **special}, f, indent=2)
  return len(spec["model"]["vocab"])


def write_text_encoder(folder: str, vocab_size: int, seed: int = 0, **overrides) -> None:
  """Writes ``text_encoder/``: a random-initialised UMT5 encoder (float32) in the transformers layout."""
  from helios_jax.io.checkpoint import TRANSFORMERS_WEIGHTS_NAME, save_safetensors_folder
  from helios_jax.models.umt5 import UMT5Config, UMT5EncoderModel
  cfg = UMT5Config(vocab_size=int(vocab_size), **{**TEXT_ENCODER_CONFIG, **overrides})
  model = UMT5EncoderModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(int(seed)))
  config = {"architectures": ["UMT5EncoderModel"], "model_type": "umt5", "d_model": cfg.d_model, "d_kv": cfg.d_kv,
            "d_ff": cfg.d_ff, "num_heads": cfg.num_heads, "num_layers": cfg.num_layers,
            "num_decoder_layers": cfg.num_layers, "vocab_size": cfg.vocab_size,
            "feed_forward_proj": cfg.feed_forward_proj, "dense_act_fn": cfg.dense_act_fn, "is_gated_act": True,
            "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
            "relative_attention_max_distance": cfg.relative_attention_max_distance,
            "layer_norm_epsilon": cfg.layer_norm_epsilon, "pad_token_id": 0, "eos_token_id": 1,
            "decoder_start_token_id": 0, "tie_word_embeddings": True, "dtype": "float32"}
  save_safetensors_folder(folder, model.state_dict(np.float32), config, weights_name=TRANSFORMERS_WEIGHTS_NAME)


def caption_embedder(text_folder: str, tokenizer_folder: str, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
  """``embed(captions) -> (B, L, D) float32 numpy``, the pipelines' prompt path (zero rows past ``</s>``)."""
  from helios_jax.models.tokenizer import encode_prompt, load_tokenizer
  from helios_jax.models.umt5 import UMT5EncoderModel
  encoder = UMT5EncoderModel.from_pretrained(text_folder, dtype=jnp.float32)
  tokenizer = load_tokenizer(tokenizer_folder)

  def embed(captions):
    return np.asarray(encode_prompt(encoder, tokenizer, list(captions), max_sequence_length), np.float32)

  return embed


# ----------------------------------------------------------------------------------------------------------------
# VAE check

RECON_SEED = 4242  # scene stream of the VAE reconstruction check (training uses 0, the quality benchmark 2024)


def reconstruction_psnr(vae, scene_cfg: scenes.SceneConfig, num_clips: int = 4, seed: int = RECON_SEED,
                        frames: int = WINDOW) -> np.ndarray:
  """Per-frame PSNR (dB) of ``vae`` on ``num_clips`` held-out ``frames``-frame clips, encoded to the posterior
  mean and decoded, each clip alone: (num_clips, frames) float64.

  The check to run before encoding a dataset with a new demo VAE: every latent the transformer learns is only as
  good as its decode, and a VAE trained on shorter clips than the 33-frame chunks it decodes can fail on the later
  frames (docs/benchmarks.md, demo section).
  """
  params, _ = scenes.scene_batch(seed, range(num_clips), scene_cfg)
  pixels = np.asarray(scenes.render(params, np.arange(frames), scene_cfg), np.float64)  # (n, F, H, W, 3) in [0, 1]
  return np.stack([frame_psnr(reconstruct(vae, pixels[i:i + 1])[0], pixels[i]) for i in range(num_clips)])


def psnr_parts(per_frame: np.ndarray) -> dict[str, float]:
  """The summary every VAE check reports from :func:`reconstruction_psnr`'s (clips, 33) array: the mean, frame 0
  (the single-frame latent I2V conditions on), frames 1-16 and frames 17-32 (where a VAE trained on short clips
  drifted), in dB."""
  p = np.asarray(per_frame, np.float64)
  return dict(mean=float(p.mean()), frame0=float(p[:, 0].mean()), frames_1_16=float(p[:, 1:17].mean()),
              frames_17_32=float(p[:, 17:].mean()))


def reconstruct(vae, pixels: np.ndarray) -> np.ndarray:
  """(B, F, H, W, 3) in [0, 1] -> ``vae``'s posterior-mean reconstruction, same layout, float64 clipped to [0, 1]."""
  recon = vae.decode(vae.encode(jnp.asarray(scenes.to_video(pixels))).latent_dist.mean).sample  # (B, 3, F, H, W)
  return np.clip((np.asarray(recon, np.float64).transpose(0, 2, 3, 4, 1) + 1.0) / 2.0, 0.0, 1.0)


def masked_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
  """PSNR (dB) of images in [0, 1] over the pixels where ``mask`` is true: a, b (..., H, W, 3), mask (..., H, W).

  With ``mask = scenes.coverage(...) > 0.5`` it scores the objects alone, which a whole-frame PSNR of these mostly
  background scenes hides. NaN when the mask is empty.
  """
  m = np.asarray(mask, bool)
  if not m.any():
    return float("nan")
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64))[m] ** 2)
  return float(10 * np.log10(1.0 / max(mse, 1e-10)))


def frame_psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Per-frame PSNR (dB) of (F, H, W, 3) images in [0, 1]: (F,) float64."""
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
  return 10 * np.log10(1.0 / np.maximum(mse, 1e-10))


# ----------------------------------------------------------------------------------------------------------------
# Encoded dataset


POSTERIORS = ("mean", "sample")


def encode_dataset(out: str, vae, embed, *, num_clips: int, num_chunks: int, seed: int,
                   scene_cfg: scenes.SceneConfig, batch: int = 16, progress: bool = False,
                   posterior: str = "mean") -> dict:
  """Renders and encodes ``num_clips`` scenes of stream ``seed`` into ``out`` (see the module docstring).

  Args:
    vae: the trained :class:`~helios_jax.models.vae.AutoencoderKLWan` (latents mean / std set).
    embed: ``captions -> (B, L, D)`` (from :func:`caption_embedder`).
    posterior: ``"mean"`` (default: the posterior mean, see the module docstring for why) or ``"sample"``
      (``mu + std * eps``, eps from stream ``seed``).
  Returns:
    the ``meta.json`` dict.
  """
  from helios_jax.models.vae import normalize_latents
  if posterior not in POSTERIORS:
    raise InputError(f"posterior must be one of {POSTERIORS}, got {posterior!r}")
  sample = posterior == "sample"
  os.makedirs(out, exist_ok=True)
  cfg = vae.config
  graphdef, state = nnx.split(vae)
  mean = jnp.asarray(cfg.latents_mean, jnp.float32)
  std = jnp.asarray(cfg.latents_std, jnp.float32)

  @jax.jit
  def encode(state, video, key):  # video (B*n, 3, 33, H, W) -> normalised latents (B*n, z, 9, h, w)
    moments = nnx.merge(graphdef, state).encode_moments(video).astype(jnp.float32)
    mu, logvar = jnp.split(moments, 2, axis=1)
    z = mu
    if sample:  # logvar clip range as the diffusers DiagonalGaussianDistribution
      z = mu + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * jax.random.normal(key, mu.shape)
    return normalize_latents(z, mean, std, jnp.float32)

  h, w = scene_cfg.height // cfg.spatial_compression, scene_cfg.width // cfg.spatial_compression
  t = cfg.num_latent_frames(WINDOW)
  latents = np.lib.format.open_memmap(os.path.join(out, "latents.npy"), mode="w+", dtype=np.float16,
                                      shape=(num_clips, num_chunks, cfg.z_dim, t, h, w))
  captions: list[str] = []
  index = np.zeros(num_clips, np.int32)
  unique: dict[str, int] = {}
  frames = np.arange(num_chunks * WINDOW)
  for start in range(0, num_clips, batch):
    ids = range(start, min(start + batch, num_clips))
    params, caps = scenes.scene_batch(seed, ids, scene_cfg)
    pixels = scenes.render(params, frames, scene_cfg)  # (b, n*33, H, W, 3)
    video = jnp.transpose(pixels * 2.0 - 1.0, (0, 4, 1, 2, 3))
    b = video.shape[0]
    video = video.reshape(b, 3, num_chunks, WINDOW, scene_cfg.height, scene_cfg.width)
    video = jnp.transpose(video, (0, 2, 1, 3, 4, 5)).reshape(b * num_chunks, 3, WINDOW, scene_cfg.height,
                                                            scene_cfg.width)
    z = encode(state, video, jax.random.fold_in(jax.random.key(seed), start))
    latents[start:start + b] = np.asarray(z, np.float16).reshape(b, num_chunks, *z.shape[1:])
    for j, c in enumerate(caps):
      index[start + j] = unique.setdefault(c, len(unique))
    captions.extend(caps)
    if progress and (start // batch) % 20 == 0:
      print(f"encoded {start + b}/{num_clips} clips", flush=True)
  latents.flush()
  del latents
  names = sorted(unique, key=unique.get)
  embeds = np.concatenate([embed(names[i:i + 64]) for i in range(0, len(names), 64)]).astype(np.float16)
  np.save(os.path.join(out, "embeds.npy"), embeds)
  np.save(os.path.join(out, "caption_index.npy"), index)
  with open(os.path.join(out, "captions.json"), "w", encoding="utf-8") as f:
    json.dump(captions, f)
  meta = dict(num_clips=num_clips, num_chunks=num_chunks, seed=seed, channels=cfg.z_dim, chunk=t, height=h,
              width=w, text_len=int(embeds.shape[1]), text_dim=int(embeds.shape[2]), unique_captions=len(names),
              pixel_height=scene_cfg.height, pixel_width=scene_cfg.width, posterior=posterior)
  with open(os.path.join(out, "meta.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2)
  return meta


class DemoLatents:
  """Random-access source over an :func:`encode_dataset` folder (items as ``SyntheticClips``: ``latents``
  (n_chunks, z, 9, h, w) float32, ``prompt_embeds`` (L, D) float32, ``caption``)."""

  def __init__(self, folder: str, in_memory: bool = True):
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
      raise InputError(f"no encoded demo dataset in {folder!r} (meta.json missing); build it with "
                       "recipes/demo/train_demo.py or recipes.demo.demo.encode_dataset")
    with open(path, encoding="utf-8") as f:
      self.meta = json.load(f)
    self._latents = np.load(os.path.join(folder, "latents.npy"), mmap_mode=None if in_memory else "r")
    self._embeds = np.load(os.path.join(folder, "embeds.npy")).astype(np.float32)
    self._index = np.load(os.path.join(folder, "caption_index.npy"))
    with open(os.path.join(folder, "captions.json"), encoding="utf-8") as f:
      self._captions = json.load(f)

  def __len__(self) -> int:
    return int(self._latents.shape[0])

  def __getitem__(self, i: int) -> dict:
    return dict(latents=np.asarray(self._latents[int(i)], np.float32),
                prompt_embeds=self._embeds[self._index[int(i)]], caption=self._captions[int(i)])


def source(data_cfg) -> DemoLatents:
  """The training source of ``data.source = "demo"`` (registered by ``configs/demo_base.py``): the encoded scene
  set in ``data_cfg.data_dir``."""
  return DemoLatents(data_cfg.data_dir)


# ----------------------------------------------------------------------------------------------------------------
# Pipeline folders

_SCHEDULER = {"_diffusers_version": "0.42.1", "gamma": 1 / 3, "num_train_timesteps": 1000,
              "prediction_type": "flow_prediction", "shift": 1.0, "stage_range": [0, 1 / 3, 2 / 3, 1],
              "use_flow_sigmas": True,
              # Training samples timesteps without a shift (config objective.use_dynamic_shifting = False), so
              # the demo samplers run unshifted too.
              "use_dynamic_shifting": False}
_UNIPC = {"_class_name": "HeliosScheduler", "disable_corrector": [], "lower_order_final": True, "predict_x0": True,
          "scheduler_type": "unipc", "solver_order": 2, "solver_p": None, "solver_type": "bh2",
          "thresholding": False, "time_shift_type": "exponential"}
KINDS = {
    "base": dict(index={"_class_name": "HeliosPipeline"}, scheduler={**_UNIPC, "stages": 1}),
    "mid": dict(index={"_class_name": "HeliosPyramidPipeline", "is_cfg_zero_star": True, "is_distilled": False},
                scheduler={**_UNIPC, "stages": 3}),
    "distilled": dict(index={"_class_name": "HeliosPyramidPipeline", "is_cfg_zero_star": False,
                             "is_distilled": True},
                      scheduler={"_class_name": "HeliosDMDScheduler", "stages": 3, "time_shift_type": "linear"}),
}


def write_pipeline_folder(out: str, kind: str, transformer: str, vae: str, text_encoder: str, tokenizer: str,
                          extra: dict | None = None) -> None:
  """Assembles a diffusers-layout folder (``model_index.json``, ``scheduler/`` and copies of the component folders)
  that ``HeliosPipeline`` / ``HeliosPyramidPipeline.from_pretrained`` and ``sample.py --model`` load.

  ``extra`` is merged into ``model_index.json`` (e.g. the demo defaults ``sample.py`` reads).
  """
  import shutil
  if kind not in KINDS:
    raise InputError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
  spec = KINDS[kind]
  os.makedirs(out, exist_ok=True)
  for name, src in (("transformer", transformer), ("vae", vae), ("text_encoder", text_encoder),
                    ("tokenizer", tokenizer)):
    dst = os.path.join(out, name)
    if os.path.abspath(src) != os.path.abspath(dst):
      shutil.rmtree(dst, ignore_errors=True)
      shutil.copytree(src, dst)
  os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
  with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
    json.dump({**_SCHEDULER, **spec["scheduler"]}, f, indent=2, sort_keys=True)
  index = {"_diffusers_version": "0.42.1", **spec["index"], "scheduler": ["diffusers", spec["scheduler"]["_class_name"]],
           "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
           "transformer": ["diffusers", "HeliosTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
           **(extra or {})}
  with open(os.path.join(out, "model_index.json"), "w", encoding="utf-8") as f:
    json.dump(index, f, indent=2, sort_keys=True)


# ----------------------------------------------------------------------------------------------------------------
# Bundled inputs of sample.py's demo defaults

ASSET_SEED = 777  # held-out scene stream (training uses 0, the VAE 1000-1001, the benchmark 2024)
ASSET_SCENES = dict(t2v=0, i2v=1, v2v=2)  # scene index of each mode's bundled prompt


def bundled_scene(prompts_path: str, mode: str = "i2v", scene_cfg: scenes.SceneConfig = scenes.SceneConfig()
                  ) -> tuple[dict, str]:
  """(params, caption) of the scene behind a bundled input, from the ``prompts.json`` that
  :func:`write_start_assets` wrote (its ``scene_seed`` and ``scene_index[mode]``)."""
  with open(prompts_path, encoding="utf-8") as f:
    meta = json.load(f)
  return scenes.sample_scene(int(meta["scene_seed"]), int(meta["scene_index"][mode]), scene_cfg)


def write_start_assets(folder: str, scene_cfg: scenes.SceneConfig = scenes.SceneConfig()) -> dict:
  """Writes ``prompts.json`` (one caption per mode), ``start.png`` (frame 0 of the i2v scene) and ``start.mp4``
  (the first 33 frames of the v2v scene) for ``sample.py``'s defaults; returns the prompts."""
  from PIL import Image
  from helios_jax.io import media
  os.makedirs(folder, exist_ok=True)
  prompts = {}
  for mode, idx in ASSET_SCENES.items():
    params, caption = scenes.sample_scene(ASSET_SEED, idx, scene_cfg)
    prompts[mode] = caption
    n = WINDOW if mode == "v2v" else 1
    pixels = np.asarray(scenes.render(scenes.stack_params([params]), np.arange(n), scene_cfg))[0]
    frames = np.round(pixels * 255).astype(np.uint8)
    if mode == "i2v":
      Image.fromarray(frames[0]).save(os.path.join(folder, "start.png"))
    elif mode == "v2v":
      media.write_video(os.path.join(folder, "start.mp4"), pixels, fps=media.DEFAULT_FPS)
  with open(os.path.join(folder, "prompts.json"), "w", encoding="utf-8") as f:
    json.dump({**prompts, "scene_seed": ASSET_SEED, "scene_index": ASSET_SCENES}, f, indent=2)
  return prompts
