"""Procedural scenes for the bundled demo model: coloured shapes moving, bouncing and spinning on textured backgrounds.

Every scene is a pure function of ``(seed, index)``: :func:`sample_scene` draws its parameters with NumPy, a caption
is written from them ("a red square moves up and left and spins clockwise on a grey striped background"), the
ground-truth object centres of any frame come from a closed form (:func:`object_positions`), and the pixels are
rendered by one vectorised JAX function (:func:`render`, jit/vmap friendly; the same code on CPU and GPU).
:func:`coverage` gives each pixel's object coverage from the same signed-distance code (the VAE's object-weighted
loss, :mod:`recipes.demo.vae_train`).

The caption fixes each object's initial velocity exactly (8 compass directions at a fixed speed, spin direction at
a fixed rate), so an image plus its caption determines the whole continuation: the I2V benchmark can compare the
model's frames and object positions against the true future (``recipes/demo/demo_quality.py``).

Parameter arrays have a fixed number of object slots (``MAX_OBJECTS``); unused slots have ``active == 0``, so a
batch of scenes stacks into arrays and renders in one call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

MAX_OBJECTS = 2
# Object colours (RGB in [0, 1]): saturated, so an object can be located by colour (demo_quality.py).
COLOURS = {
    "red": (0.90, 0.15, 0.15), "green": (0.15, 0.80, 0.25), "blue": (0.15, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15), "purple": (0.65, 0.25, 0.85), "white": (0.97, 0.97, 0.97),
}
SHAPES = ("square", "circle", "triangle")
# Background base colours: muted, so objects stand out.
BACKGROUNDS = {"grey": (0.40, 0.40, 0.42), "brown": (0.42, 0.30, 0.20), "navy": (0.12, 0.16, 0.35),
               "olive": (0.33, 0.36, 0.16)}
TEXTURES = ("striped", "checkered", "plain")
# Compass directions (unit vectors in image coordinates: x right, y down) and their caption words.
DIRECTIONS = {
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
    "up and left": (-0.7071, -0.7071), "up and right": (0.7071, -0.7071),
    "down and left": (-0.7071, 0.7071), "down and right": (0.7071, 0.7071),
}
SPINS = {"": 0.0, "clockwise": 1.0, "counterclockwise": -1.0}


@dataclasses.dataclass(frozen=True)
class SceneConfig:
  """Scene geometry. Speeds are in pixels / radians per video frame at 24 fps.

  Attributes:
    height, width: frame size in pixels (multiples of 64 so a 3-stage pyramid of 8x-compressed latents works).
    speed: object speed in pixels per frame along its direction (33 px per 33-frame chunk at 1.0).
    spin_rate: angular speed of spinning objects (rad / frame).
    radius_min, radius_max: object circumradius range as a fraction of min(height, width).
    two_object_prob: probability of a second object.
    spin_prob: probability that a square or triangle spins.
  """

  height: int = 128
  width: int = 128
  speed: float = 1.0
  spin_rate: float = 0.08
  radius_min: float = 0.09
  radius_max: float = 0.14
  two_object_prob: float = 0.5
  spin_prob: float = 0.5


def vocabulary() -> list[str]:
  """Every word a caption can contain (the demo tokenizer's vocabulary), sorted."""
  words = {"a", "moves", "and", "spins", "on", "background"}
  for group in (COLOURS, SHAPES, BACKGROUNDS, TEXTURES, DIRECTIONS, SPINS):
    for phrase in group:
      words.update(phrase.split())
  return sorted(words)


def sample_scene(seed: int, index: int, cfg: SceneConfig = SceneConfig()) -> tuple[dict, str]:
  """Parameters and caption of scene ``index`` of the stream ``seed``.

  Returns:
    (params, caption). ``params`` holds float32 / int32 NumPy arrays: ``active`` (K,), ``shape`` (K,) index into
    SHAPES, ``colour`` (K, 3), ``pos0`` (K, 2) centre (x, y) in pixels at frame 0, ``vel`` (K, 2) pixels/frame,
    ``radius`` (K,), ``angle0`` (K,), ``omega`` (K,) rad/frame, ``bg`` (3,), ``bg2`` (3,) second texture colour,
    ``texture`` () index into TEXTURES, ``tex_freq`` () cycles per frame width, ``tex_angle`` (); K = MAX_OBJECTS.
  """
  rng = np.random.default_rng([int(seed), int(index)])
  k = MAX_OBJECTS
  size = min(cfg.height, cfg.width)
  n_obj = 2 if rng.uniform() < cfg.two_object_prob else 1
  colour_names = rng.choice(sorted(COLOURS), size=n_obj, replace=False)
  bg_name = str(rng.choice(sorted(BACKGROUNDS)))
  texture = int(rng.integers(len(TEXTURES)))
  p = dict(active=np.zeros(k, np.float32), shape=np.zeros(k, np.int32), colour=np.zeros((k, 3), np.float32),
           pos0=np.zeros((k, 2), np.float32), vel=np.zeros((k, 2), np.float32), radius=np.ones(k, np.float32),
           angle0=np.zeros(k, np.float32), omega=np.zeros(k, np.float32))
  phrases = []
  for i in range(n_obj):
    shape = int(rng.integers(len(SHAPES)))
    direction = str(rng.choice(list(DIRECTIONS)))
    radius = rng.uniform(cfg.radius_min, cfg.radius_max) * size
    spin = ""
    if SHAPES[shape] != "circle" and rng.uniform() < cfg.spin_prob:
      spin = str(rng.choice(["clockwise", "counterclockwise"]))
    p["active"][i] = 1.0
    p["shape"][i] = shape
    p["colour"][i] = COLOURS[str(colour_names[i])]
    p["pos0"][i] = rng.uniform([radius, radius], [cfg.width - radius, cfg.height - radius])
    p["vel"][i] = np.asarray(DIRECTIONS[direction], np.float32) * cfg.speed
    p["radius"][i] = radius
    p["angle0"][i] = rng.uniform(0, 2 * np.pi)
    p["omega"][i] = SPINS[spin] * cfg.spin_rate
    phrase = f"a {colour_names[i]} {SHAPES[shape]} moves {direction}"
    phrases.append(phrase + (f" and spins {spin}" if spin else ""))
  bg = np.asarray(BACKGROUNDS[bg_name], np.float32)
  p["bg"] = bg
  p["bg2"] = np.clip(bg + rng.uniform(0.08, 0.16) * np.sign(0.5 - bg.mean()), 0, 1).astype(np.float32)
  p["texture"] = np.int32(texture)
  p["tex_freq"] = np.float32(rng.uniform(3.0, 6.0))
  p["tex_angle"] = np.float32(rng.uniform(0, np.pi))
  tex_word = "" if TEXTURES[texture] == "plain" else TEXTURES[texture] + " "
  caption = " and ".join(phrases) + f" on a {bg_name} {tex_word}background"
  return p, caption


def stack_params(params: list[dict]) -> dict:
  """Stacks per-scene parameter dicts along a new leading axis (B)."""
  return {k: np.stack([p[k] for p in params]) for k in params[0]}


def _bounce(x, lo, hi, xp):
  """Reflects the unbounded coordinate ``x`` into [lo, hi] (a triangle wave: elastic bounces off both walls)."""
  span = xp.maximum(hi - lo, 1e-6)
  y = xp.mod(x - lo, 2 * span)
  return lo + xp.where(y > span, 2 * span - y, y)


def object_positions(params: dict, frames, cfg: SceneConfig = SceneConfig(), xp=np):
  """Ground-truth object centres (x, y) in pixels: (..., F, K, 2) for frame indices ``frames`` (F,).

  Objects bounce elastically off the frame borders at their circumradius.
  """
  t = xp.asarray(frames, xp.float32)[:, None, None]
  pos0, vel, radius = params["pos0"], params["vel"], params["radius"]
  lo = radius[..., None, :, None]
  hi = xp.stack([cfg.width - radius, cfg.height - radius], axis=-1)[..., None, :, :]
  return _bounce(pos0[..., None, :, :] + vel[..., None, :, :] * t, lo, hi, xp)


def _grid(cfg: SceneConfig) -> tuple[jax.Array, jax.Array]:
  """Pixel-centre coordinates (yy, xx), each (H, W)."""
  return jnp.meshgrid(jnp.arange(cfg.height, dtype=jnp.float32) + 0.5, jnp.arange(cfg.width, dtype=jnp.float32) + 0.5,
                      indexing="ij")


def _object_covers(params: dict, frames: jax.Array, cfg: SceneConfig) -> jax.Array:
  """Anti-aliased coverage of each object slot of one scene: (K, F, H, W) in [0, 1], 0 for inactive slots."""
  yy, xx = _grid(cfg)
  pos = object_positions(params, frames, cfg, xp=jnp)  # (F, K, 2)
  angle = params["angle0"][None] + params["omega"][None] * frames[:, None].astype(jnp.float32)  # (F, K)
  # equilateral triangle with circumradius r: three half-planes at distance r/2 from the centre
  normals = [(np.cos(a), np.sin(a)) for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)]
  covers = []
  for i in range(MAX_OBJECTS):
    dx = xx[None] - pos[:, i, 0, None, None]
    dy = yy[None] - pos[:, i, 1, None, None]
    c, s = jnp.cos(angle[:, i])[:, None, None], jnp.sin(angle[:, i])[:, None, None]
    qx, qy = c * dx + s * dy, -s * dx + c * dy  # object-frame coordinates
    r = params["radius"][i]
    d_square = jnp.maximum(jnp.abs(qx), jnp.abs(qy)) - 0.75 * r
    d_circle = jnp.sqrt(qx ** 2 + qy ** 2) - 0.85 * r
    d_tri = jnp.max(jnp.stack([nx * qx + ny * qy for nx, ny in normals]), axis=0) - 0.5 * r
    d = jnp.stack([d_square, d_circle, d_tri])[params["shape"][i]]
    covers.append(jnp.clip(0.5 - d, 0.0, 1.0) * params["active"][i])  # 1-pixel anti-aliased edge
  return jnp.stack(covers)


def _render_one(params: dict, frames: jax.Array, cfg: SceneConfig) -> jax.Array:
  """One scene: (F, H, W, 3) float32 in [0, 1]."""
  return _render_and_cover_one(params, frames, cfg)[0]


def _render_and_cover_one(params: dict, frames: jax.Array, cfg: SceneConfig) -> tuple[jax.Array, jax.Array]:
  """One scene's pixels (F, H, W, 3) and object coverage (F, H, W) from one evaluation of the objects' shapes."""
  yy, xx = _grid(cfg)
  w = cfg.width
  # background texture
  u = (xx * jnp.cos(params["tex_angle"]) + yy * jnp.sin(params["tex_angle"])) / w
  stripes = 0.5 + 0.5 * jnp.sin(2 * jnp.pi * params["tex_freq"] * u)
  cell = params["tex_freq"] / w
  checker = (jnp.floor(xx * cell) + jnp.floor(yy * cell)) % 2
  mix = jnp.stack([stripes, checker, jnp.zeros_like(u)])[params["texture"]]
  bg = params["bg"] * (1 - mix[..., None]) + params["bg2"] * mix[..., None]
  img = jnp.broadcast_to(bg, (frames.shape[0], cfg.height, w, 3))
  covers = _object_covers(params, frames, cfg)
  for i, cover in enumerate(covers):  # later objects are drawn over earlier ones
    img = img * (1 - cover[..., None]) + params["colour"][i] * cover[..., None]
  return img, jnp.max(covers, axis=0)


def _coverage_one(params: dict, frames: jax.Array, cfg: SceneConfig) -> jax.Array:
  """One scene: (F, H, W) float32 in [0, 1], the largest coverage of a pixel by any of the scene's objects."""
  return jnp.max(_object_covers(params, frames, cfg), axis=0)


def render(params: dict, frames, cfg: SceneConfig = SceneConfig()) -> jax.Array:
  """Pixels of scenes: params with a leading batch axis B -> (B, F, H, W, 3) float32 in [0, 1].

  ``frames`` are absolute frame indices (F,) int; a clip's chunk ``c`` is frames ``33 c .. 33 c + 32``.
  """
  return _compiled(_render_one, cfg)(jax.tree_util.tree_map(jnp.asarray, params), jnp.asarray(frames, jnp.int32))


def coverage(params: dict, frames, cfg: SceneConfig = SceneConfig()) -> jax.Array:
  """Object coverage of every pixel of :func:`render`'s frames: (B, F, H, W) float32 in [0, 1].

  The anti-aliased coverage the renderer blends each object's colour with (1 inside an object, 0 on the
  background, fractional on its 1-pixel edge), the maximum over the scene's objects where they overlap.
  """
  return _compiled(_coverage_one, cfg)(jax.tree_util.tree_map(jnp.asarray, params), jnp.asarray(frames, jnp.int32))


def render_with_coverage(params: dict, frames, cfg: SceneConfig = SceneConfig()) -> tuple[jax.Array, jax.Array]:
  """:func:`render` and :func:`coverage` of the same frames in one call (the shapes are evaluated once):
  (B, F, H, W, 3), (B, F, H, W)."""
  return _compiled(_render_and_cover_one, cfg)(jax.tree_util.tree_map(jnp.asarray, params),
                                               jnp.asarray(frames, jnp.int32))


_COMPILED: dict = {}  # one jitted function per (per-scene function, SceneConfig)


def _compiled(fn, cfg: SceneConfig):
  """``fn(params, frames, cfg)`` of one scene, jitted and vmapped over the scenes of a batch (frames shared)."""
  if (fn, cfg) not in _COMPILED:
    _COMPILED[fn, cfg] = jax.jit(jax.vmap(lambda p, f: fn(p, f, cfg), in_axes=(0, None)))
  return _COMPILED[fn, cfg]


def to_video(pixels) -> np.ndarray:
  """(B, F, H, W, 3) [0, 1] -> (B, 3, F, H, W) float32 in [-1, 1], the VAE's input layout."""
  x = np.asarray(pixels, np.float32) * 2.0 - 1.0
  return np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))


def scene_batch(seed: int, indices, cfg: SceneConfig = SceneConfig()) -> tuple[dict, list[str]]:
  """Stacked parameters and captions of scenes ``indices`` of stream ``seed``."""
  out = [sample_scene(seed, int(i), cfg) for i in indices]
  return stack_params([p for p, _ in out]), [c for _, c in out]
