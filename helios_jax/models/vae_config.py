"""The configuration of the Wan2.1 VAE (the fields of a diffusers ``vae/config.json``) and its latent statistics."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from helios_jax.errors import CheckpointError

_WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
                       0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
_WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
                      1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
  """The fields of a diffusers ``vae/config.json`` (defaults = Wan2.1, the VAE Helios uses)."""

  base_dim: int = 96
  decoder_base_dim: int | None = None
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_scales: tuple[float, ...] = ()
  temperal_downsample: tuple[bool, ...] = (False, True, True)
  dropout: float = 0.0
  latents_mean: tuple[float, ...] = _WAN21_LATENTS_MEAN
  latents_std: tuple[float, ...] = _WAN21_LATENTS_STD
  is_residual: bool = False
  in_channels: int = 3
  out_channels: int = 3
  patch_size: int | None = None
  scale_factor_temporal: int | None = 4
  scale_factor_spatial: int | None = 8

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> "WanVAEConfig":
    """Builds the config from a ``config.json`` dict; ``_``-prefixed and unknown keys are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in config.items():
      if k not in names:
        continue
      kwargs[k] = tuple(v) if isinstance(v, list) else v
    try:
      cfg = cls(**kwargs)
    except TypeError as e:
      raise CheckpointError(f"invalid VAE config: {e}") from None
    cfg.validate()
    return cfg

  def to_dict(self) -> dict[str, Any]:
    """The ``config.json`` dict diffusers' ``AutoencoderKLWan`` reads (tuples as lists)."""
    out = {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.42.1"}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      out[f.name] = list(v) if isinstance(v, tuple) else v
    return out

  def validate(self) -> None:
    if self.is_residual:
      raise CheckpointError("VAE config has is_residual=True (Wan2.2 VAE); only the Wan2.1 VAE is supported")
    if self.patch_size not in (None, 1):
      raise CheckpointError(f"VAE config has patch_size={self.patch_size} (Wan2.2 VAE); only Wan2.1 is supported")
    if self.attn_scales:
      raise CheckpointError(f"VAE config has attn_scales={list(self.attn_scales)}; only [] is supported "
                            "(diffusers cannot run encoder attention blocks either)")
    if len(self.temperal_downsample) != len(self.dim_mult) - 1:
      raise CheckpointError(f"VAE config: temperal_downsample needs {len(self.dim_mult) - 1} entries, "
                            f"got {len(self.temperal_downsample)}")
    if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
      raise CheckpointError(f"VAE config: latents_mean/latents_std must have z_dim={self.z_dim} entries")

  @property
  def temporal_compression(self) -> int:
    return 2 ** sum(bool(t) for t in self.temperal_downsample)

  @property
  def spatial_compression(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)

  def num_latent_frames(self, num_frames: int) -> int:
    """Latent frames produced by :meth:`AutoencoderKLWan.encode` for ``num_frames`` video frames."""
    t = 1 + 4 * ((num_frames - 1) // 4)
    for down in self.temperal_downsample:
      if down:
        t = 1 + (t - 1) // 2
    return t

  def num_frames(self, num_latent_frames: int) -> int:
    """Video frames produced by :meth:`AutoencoderKLWan.decode` for ``num_latent_frames`` latents."""
    return 1 + self.temporal_compression * (num_latent_frames - 1)
