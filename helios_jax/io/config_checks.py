"""Sanity limits on the sizes in a model folder's ``config.json``, checked before any array is allocated.

A model folder is untrusted input: a config saying ``num_layers: 1000000000`` or ``attention_head_dim: -4`` would
otherwise reach the model constructor and fail deep inside JAX (or try to allocate terabytes). :func:`check_sizes`
refuses such values with one :class:`~helios_jax.errors.CheckpointError`; the loaders (``load_config``) call it.
Only the size fields listed below are checked, whatever model the config describes (transformer, VAE, UMT5).
"""

from __future__ import annotations

from helios_jax.errors import CheckpointError

# Integer fields that count things; each must be >= 1 and at most the bound (far above any real Helios / Wan /
# UMT5 model: 14B has 40 layers, 40 heads of 128, ffn 13824; UMT5-XXL a 256384-token vocabulary).
MAX_LAYERS = 10_000
MAX_DIM = 1 << 22  # 4M: widths, vocabulary, channels
SIZE_FIELDS = {
    "num_layers": MAX_LAYERS, "num_decoder_layers": MAX_LAYERS, "num_res_blocks": MAX_LAYERS,
    "num_attention_heads": MAX_DIM, "num_heads": MAX_DIM, "attention_head_dim": MAX_DIM, "d_kv": MAX_DIM,
    "d_model": MAX_DIM, "d_ff": MAX_DIM, "hidden_size": MAX_DIM, "ffn_dim": MAX_DIM, "text_dim": MAX_DIM,
    "freq_dim": MAX_DIM, "in_channels": MAX_DIM, "out_channels": MAX_DIM, "vocab_size": MAX_DIM,
    "base_dim": MAX_DIM, "z_dim": MAX_DIM, "relative_attention_num_buckets": MAX_DIM,
    "relative_attention_max_distance": MAX_DIM, "image_dim": MAX_DIM, "pos_embed_seq_len": MAX_DIM,
}
# Fields holding lists of sizes (each entry >= 1, bounded by MAX_DIM).
LIST_FIELDS = ("patch_size", "dim_mult", "rope_dim", "history_scale_mode_sizes")
# Width x depth bound on the parameter count the sizes imply (~70x the 14B model).
MAX_PARAMS = 10 ** 12


def check_sizes(config: dict, source: str) -> None:
  """Raises :class:`CheckpointError` naming ``source`` when a size field of ``config`` is not a sane count."""
  if not isinstance(config, dict):
    raise CheckpointError(f"{source} is not a JSON object")
  for key, bound in SIZE_FIELDS.items():
    if key in config and config[key] is not None:
      _check_int(config[key], key, bound, source)
  for key in LIST_FIELDS:
    value = config.get(key)
    if value is None:
      continue
    if not isinstance(value, (list, tuple)):
      raise CheckpointError(f"{source}: {key} must be a list of sizes, got {value!r}")
    for v in value:
      _check_int(v, key, MAX_DIM, source)
  layers = int(config.get("num_layers") or 1)
  width = max(int(config.get(k) or 1) for k in ("d_model", "hidden_size", "ffn_dim", "d_ff")) \
      if any(k in config for k in ("d_model", "hidden_size", "ffn_dim", "d_ff")) else 1
  heads = int(config.get("num_attention_heads") or 1) * int(config.get("attention_head_dim") or 1)
  width = max(width, heads)
  if layers * width * width > MAX_PARAMS:  # one width x width matrix per layer is a lower bound of the size
    raise CheckpointError(f"{source}: num_layers={layers} at width {width} implies over {MAX_PARAMS:.0e} "
                          "parameters; this config is not a Helios model")


def _check_int(v, key: str, bound: int, source: str) -> None:
  if isinstance(v, bool) or not isinstance(v, int):
    raise CheckpointError(f"{source}: {key} must be an integer, got {v!r}")
  if not 1 <= v <= bound:
    raise CheckpointError(f"{source}: {key}={v} is out of range (1 .. {bound})")
