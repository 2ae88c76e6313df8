"""Export of a trained run: the adapters fused into the base, written as a diffusers transformer folder."""

from __future__ import annotations

from helios_jax.training import lora, stages


def export_merged(folder: str, graphdef, frozen, trainable: dict, train_cfg, dtype=None) -> None:
  """Fuses the adapters and writes a diffusers transformer folder that ``from_pretrained`` loads."""
  from helios_jax.io.checkpoint import save_safetensors_folder
  from helios_jax.io.transformer_weights import to_diffusers_state_dict
  model = lora.merge_into_model(graphdef, frozen, trainable, stages.lora_scale(train_cfg))
  tensors = to_diffusers_state_dict(model, dtype=dtype)
  save_safetensors_folder(folder, tensors, model.config.to_dict())
