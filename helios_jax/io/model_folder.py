"""What a diffusers-format Helios model folder holds, and the sampling defaults it implies (no weights read).

:func:`inspect_model_folder` reads ``model_index.json`` and the scheduler / transformer / VAE configs, checks that
the components a run needs are there, and resolves every setting the caller left out into a :class:`ModelPlan`:

* Distilled (``is_distilled``): pyramid steps 2 2 2, guidance 1.0, amplified first chunk, 240 frames;
* Mid (``is_cfg_zero_star``): pyramid steps 20 20 20, guidance 5.0 (CFG-Zero*), 99 frames;
* another pyramid folder: 10 steps per stage, guidance 5.0, 99 frames;
* Base (``HeliosPipeline``): 50 steps, guidance 5.0, 99 frames;

always 384x640 in bf16, unless the folder's ``helios_jax_defaults`` (written by this repository's trainers) says
otherwise. :func:`load_pipeline` then loads the matching pipeline class, and :func:`bundled_demo` locates the small
demo model shipped in ``helios_jax/assets/demo``.

Mistakes are :class:`~helios_jax.errors.InputError` (a bad setting) or :class:`~helios_jax.errors.CheckpointError`
(a missing or unreadable folder / component), each one sentence. Messages name the settings as the caller spells
them (``option_names``: a command line passes ``{"steps": "--steps", ...}``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from helios_jax.errors import CheckpointError, InputError
from helios_jax.io.checkpoint import load_json
from helios_jax.io.config_checks import check_sizes

DEFAULT_HEIGHT, DEFAULT_WIDTH = 384, 640
DTYPES = ("bf16", "fp32")
DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo")

# How messages name each setting, unless the caller's ``option_names`` says otherwise.
DEFAULT_OPTION_NAMES: Mapping[str, str] = {
    "height": "height", "width": "width", "steps": "steps", "guidance": "guidance", "num_frames": "num_frames",
    "dtype": "dtype", "prompt": "a prompt", "prompt_embeds": "prompt embeddings"}


@dataclasses.dataclass(frozen=True)
class ModelPlan:
  """The resolved settings of one run on one model folder.

  Attributes:
    pyramid: the folder is a ``HeliosPyramidPipeline`` (Mid, Distilled), else a plain ``HeliosPipeline`` (Base).
    kind: "Distilled", "Mid", "pyramid" or "Base" (for messages).
    steps: one denoising step count per pyramid stage, or a single count for the plain sampler.
    guidance: classifier-free guidance scale (1 disables it).
    num_frames: frames to generate.
    height, width: frame size in pixels.
    dtype: "bf16" or "fp32", the transformer's and text encoder's dtype (the VAE runs in fp32).
    distilled: ``is_distilled`` (the first chunk is amplified).
    text_dim: width of the prompt embeddings the transformer takes.
    temporal: the VAE's temporal compression (4 for Wan2.1).
    window: frames per chunk (33 for Helios).
    has_text_encoder: the folder has ``text_encoder/`` and ``tokenizer/`` (prompts can be encoded).
  """

  pyramid: bool
  kind: str
  steps: tuple[int, ...]
  guidance: float
  num_frames: int
  height: int
  width: int
  dtype: str
  distilled: bool
  text_dim: int
  temporal: int
  window: int
  has_text_encoder: bool

  @property
  def jax_dtype(self) -> Any:
    """``dtype`` as a JAX dtype."""
    import jax.numpy as jnp
    return jnp.bfloat16 if self.dtype == "bf16" else jnp.float32

  def sampler_kwargs(self) -> dict[str, Any]:
    """The step keywords of the pipeline call: ``num_inference_steps`` (plain) or
    ``pyramid_num_inference_steps_list`` and ``is_amplify_first_chunk`` (pyramid)."""
    if self.pyramid:
      return dict(pyramid_num_inference_steps_list=tuple(self.steps), is_amplify_first_chunk=self.distilled)
    return dict(num_inference_steps=self.steps[0])

  def pipeline_kwargs(self) -> dict[str, Any]:
    """:meth:`sampler_kwargs` plus ``height``, ``width``, ``num_frames`` and ``guidance_scale``: the keywords of
    ``pipe(...)`` / ``pipe.stream(...)`` that the plan decides (prompts, inputs and the seed are the caller's)."""
    return dict(height=self.height, width=self.width, num_frames=self.num_frames, guidance_scale=self.guidance,
                **self.sampler_kwargs())


def _component(model: str, name: str, config: str) -> str:
  folder = os.path.join(model, name)
  if not os.path.isdir(folder):
    raise CheckpointError(f"{model} has no {name}/ folder")
  if not os.path.isfile(os.path.join(folder, config)):
    raise CheckpointError(f"{folder} has no {config}")
  return folder


def _check_values(names: Mapping[str, str], height: int | None, width: int | None, dtype: str | None,
                  steps: Sequence[int] | None, guidance: float | None, num_frames: int | None) -> None:
  """The checks on the caller's settings that need no model folder."""
  if num_frames is not None and num_frames <= 0:
    raise InputError(f"{names['num_frames']} must be positive, got {num_frames}")
  if (height is not None and height <= 0) or (width is not None and width <= 0):
    raise InputError(f"{names['height']} and {names['width']} must be positive, got {height}x{width}")
  if steps is not None and (len(steps) == 0 or min(steps) < 1):
    raise InputError(f"{names['steps']} must be positive, got {' '.join(map(str, steps)) or 'nothing'}")
  if guidance is not None and guidance < 0:
    raise InputError(f"{names['guidance']} must be >= 0, got {guidance}")
  if dtype is not None and dtype not in DTYPES:
    raise InputError(f"{names['dtype']} must be one of {', '.join(DTYPES)}, got {dtype!r}")


def inspect_model_folder(model: str, *, height: int | None = None, width: int | None = None,
                         dtype: str | None = None, steps: Sequence[int] | None = None, guidance: float | None = None,
                         num_frames: int | None = None, needs_text_encoder: bool = True,
                         option_names: Mapping[str, str] | None = None) -> ModelPlan:
  """Reads ``model``'s configs (no weights) and resolves the settings left as None from the folder's defaults.

  Args:
    model: a diffusers-format Helios folder (``model_index.json``, ``scheduler/``, ``transformer/``, ``vae/``, and
      ``text_encoder/`` + ``tokenizer/`` where prompts are to be encoded).
    height, width, dtype, steps, guidance, num_frames: the caller's settings; None takes the folder's default.
    needs_text_encoder: the run encodes a prompt, so ``text_encoder/`` and ``tokenizer/`` must be there.
    option_names: how error messages name the settings (keys of :data:`DEFAULT_OPTION_NAMES`).

  Raises:
    InputError: a setting out of range, a ``steps`` count that does not fit the sampler, or a frame size that is
      not a multiple of what the VAE, the pyramid and the patch size need.
    CheckpointError: the folder, a needed component or one of its configs is missing or unreadable.
  """
  names = {**DEFAULT_OPTION_NAMES, **(option_names or {})}
  _check_values(names, height, width, dtype, steps, guidance, num_frames)
  if not os.path.isdir(model):
    raise CheckpointError(f"model folder not found: {model}")
  index = load_json(os.path.join(model, "model_index.json"), "model_index.json")
  sched = load_json(os.path.join(_component(model, "scheduler", "scheduler_config.json"), "scheduler_config.json"),
                    "scheduler config")
  tcfg = load_json(os.path.join(_component(model, "transformer", "config.json"), "config.json"),
                   "transformer config")
  vcfg = load_json(os.path.join(_component(model, "vae", "config.json"), "config.json"), "VAE config")
  check_sizes(tcfg, os.path.join(model, "transformer", "config.json"))  # untrusted: sane sizes before any use
  check_sizes(vcfg, os.path.join(model, "vae", "config.json"))
  has_text = all(os.path.isdir(os.path.join(model, name)) for name in ("text_encoder", "tokenizer"))
  if needs_text_encoder:
    for name in ("text_encoder", "tokenizer"):
      if not os.path.isdir(os.path.join(model, name)):
        raise CheckpointError(f"{model} has no {name}/ folder to encode {names['prompt']} (pass "
                              f"{names['prompt_embeds']} instead)")
    _component(model, "text_encoder", "config.json")

  stages = int(sched.get("stages", 1))
  folder_defaults = index.get("helios_jax_defaults") or {}  # recommended settings written by the folder's trainer
  pyramid = index.get("_class_name", "") == "HeliosPyramidPipeline" or stages > 1
  distilled = bool(index.get("is_distilled", False))
  zero_star = bool(index.get("is_cfg_zero_star", False))
  if pyramid:
    kind = "Distilled" if distilled else ("Mid" if zero_star else "pyramid")
    default_steps = [2 if distilled else (20 if zero_star else 10)] * stages
    default_guidance = 1.0 if distilled else 5.0
  else:
    kind, default_steps, default_guidance = "Base", [50], 5.0
  if steps is not None:
    want = stages if pyramid else 1
    if len(steps) != want:
      raise InputError(f"{names['steps']} needs {want} number{'s' if want > 1 else ''} for this model "
                       f"({'one per pyramid stage' if pyramid else 'plain sampler'}), got {len(steps)}")
  steps = tuple(int(s) for s in (steps if steps is not None else folder_defaults.get("steps", default_steps)))
  guidance = float(guidance if guidance is not None else folder_defaults.get("guidance", default_guidance))
  height = int(height if height is not None else folder_defaults.get("height", DEFAULT_HEIGHT))
  width = int(width if width is not None else folder_defaults.get("width", DEFAULT_WIDTH))
  dtype = dtype if dtype is not None else folder_defaults.get("dtype", "bf16")
  num_frames = int(num_frames or folder_defaults.get("num_frames", 240 if distilled else 99))

  patch = tcfg.get("patch_size", [1, 2, 2])
  spatial = 2 ** (len(vcfg.get("dim_mult", [1, 2, 4, 4])) - 1)
  temporal = 2 ** sum(bool(t) for t in vcfg.get("temperal_downsample", [False, True, True]))
  mult = spatial * 2 ** ((stages if pyramid else 1) - 1) * max(int(patch[1]), int(patch[2]))
  if height % mult or width % mult:
    raise InputError(f"{names['height']} and {names['width']} must be multiples of {mult} for this model, got "
                     f"{height}x{width} (Helios was trained at 384x640)")
  return ModelPlan(pyramid=pyramid, kind=kind, steps=steps, guidance=guidance, num_frames=num_frames, height=height,
                   width=width, dtype=dtype, distilled=distilled, text_dim=int(tcfg.get("text_dim", 4096)),
                   temporal=temporal, window=8 * temporal + 1, has_text_encoder=has_text)


def load_pipeline(model: str, plan: ModelPlan, load_text_encoder: bool = True, quantization: str | None = None):
  """Loads ``model`` as the pipeline class ``plan`` calls for (``HeliosPyramidPipeline`` or ``HeliosPipeline``),
  the transformer and text encoder in ``plan.dtype``, the VAE in fp32; ``quantization="fp8"`` stores the
  transformer blocks' linear kernels in float8 (per-channel scales; :mod:`helios_jax.models.fp8`).

  Raises:
    CheckpointError: a component's weights are missing or do not fit its config.
  """
  from helios_jax.pipelines import HeliosPipeline, HeliosPyramidPipeline
  cls = HeliosPyramidPipeline if plan.pyramid else HeliosPipeline
  return cls.from_pretrained(model, dtype=plan.jax_dtype, text_encoder_dtype=plan.jax_dtype,
                             load_text_encoder=load_text_encoder,
                             quantization=None if quantization in (None, "none") else quantization)


@dataclasses.dataclass(frozen=True)
class BundledDemo:
  """The demo model shipped with the package and its bundled inputs.

  Attributes:
    model: the diffusers-format model folder.
    prompts: one caption per mode ("t2v", "i2v", "v2v"), from ``prompts.json``.
    image: the bundled I2V start image (PNG).
    video: the bundled V2V start video (mp4, one chunk).
    model_card: the demo's ``README.md``.
  """

  model: str
  prompts: Mapping[str, str]
  image: str
  video: str
  model_card: str


def bundled_demo(root: str | None = None) -> BundledDemo:
  """The bundled demo model under ``root`` (default :data:`DEMO_DIR`).

  Raises:
    CheckpointError: the installation has no bundled demo model.
  """
  root = root or DEMO_DIR
  model = os.path.join(root, "model")
  if not os.path.isfile(os.path.join(model, "model_index.json")):
    raise CheckpointError(f"the bundled demo model is missing from this installation ({model})")
  try:
    with open(os.path.join(root, "prompts.json"), encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read the bundled demo prompts {os.path.join(root, 'prompts.json')}: {e}") \
        from None
  prompts = {mode: meta[mode] for mode in ("t2v", "i2v", "v2v") if isinstance(meta.get(mode), str)}
  return BundledDemo(model=model, prompts=prompts, image=os.path.join(root, "start.png"),
                     video=os.path.join(root, "start.mp4"), model_card=os.path.join(root, "README.md"))


__all__ = ["ModelPlan", "inspect_model_folder", "load_pipeline", "BundledDemo", "bundled_demo", "DEMO_DIR",
           "DEFAULT_HEIGHT", "DEFAULT_WIDTH", "DTYPES", "DEFAULT_OPTION_NAMES"]
