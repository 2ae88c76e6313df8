"""Procedural latent clips: moving coloured Gaussian blobs drawn directly in latent space.

Lets the tiny configs and tests train anywhere without a VAE or real videos. Every clip is a pure function of its
index and the source seed, so data order and content are reproducible across restarts.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticClips:
  """A random-access source of clips shaped like the offline-encoded latents (spec 3.1).

  Item ``i`` is a dict: ``latents`` (n_chunks, C, chunk, h, w) float32, ``prompt_embeds`` (S, D) float32 and
  ``caption`` (str). The prompt embedding encodes the blobs' colours and velocity, so text conditioning is useful.
  """

  num_clips: int = 64
  num_chunks: int = 4
  channels: int = 16
  chunk: int = 9
  height: int = 48
  width: int = 80
  text_len: int = 8
  text_dim: int = 4096
  num_blobs: int = 2
  seed: int = 0

  def __len__(self) -> int:
    return self.num_clips

  def __getitem__(self, index: int) -> dict:
    rng = np.random.default_rng([self.seed, int(index)])
    t = self.num_chunks * self.chunk
    c, h, w = self.channels, self.height, self.width
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    video = np.zeros((t, c, h, w), np.float32) + rng.normal(0, 0.1, (1, c, 1, 1)).astype(np.float32)
    params = []
    for _ in range(self.num_blobs):
      colour = rng.normal(0, 1, c).astype(np.float32)
      pos = rng.uniform([0, 0], [h, w])
      vel = rng.uniform(-1, 1, 2) * np.array([h, w]) / (2.0 * t)
      radius = rng.uniform(0.12, 0.25) * min(h, w)
      params.append(np.concatenate([colour[:4], vel / np.array([h, w]) * t]))
      for f in range(t):
        p = pos + vel * f
        p = np.abs(np.mod(p, 2 * np.array([h, w])))  # bounce off the borders
        p = np.where(p > np.array([h, w]), 2 * np.array([h, w]) - p, p)
        g = np.exp(-((yy - p[0]) ** 2 + (xx - p[1]) ** 2) / (2 * radius ** 2)).astype(np.float32)
        video[f] += colour[:, None, None] * g[None]
    latents = video.reshape(self.num_chunks, self.chunk, c, h, w).transpose(0, 2, 1, 3, 4)
    code = np.concatenate(params).astype(np.float32)
    proj = np.random.default_rng([self.seed, 1 << 20]).normal(0, 1 / np.sqrt(code.size),
                                                                 (self.text_len, code.size, self.text_dim))
    prompt = np.einsum("k,skd->sd", code, proj).astype(np.float32)
    return dict(latents=np.ascontiguousarray(latents), prompt_embeds=prompt, caption=f"synthetic clip {index}")
