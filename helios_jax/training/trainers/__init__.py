"""One trainer per stage, each a state + step function on the one loop (:mod:`helios_jax.training.loop`): ``base``
(stages 1-2), ``ode`` (stage 3 phase 5), ``ahd`` (stage 3 DMD + GAN). Chosen by config.stage in
:func:`helios_jax.training.dispatch.train`; a trainer imports only the library, never another trainer."""
