"""The bundled demo model's recipe: procedural scenes (``scenes``), its text encoder / dataset / folder writer
(``demo``), its VAE trainer (``vae_train``), the training chain (``train_demo``) and its studies (``demo_quality``,
``demo_conditioning``, ``demo_vae_check``, ``demo_vae_object_ab``, ``finetune_demo_vae``, ``fp8_demo_psnr``). Run
them from the repository root as ``python -m recipes.demo.<name>``; configs are ``configs/demo_*.py``. Uses the
helios_jax library, which never imports it."""
