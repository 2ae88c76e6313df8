"""Trains Helios stage 1 (Base), stage 2 (Mid) or stage 3 (Distilled: configs/ode.py, then configs/ahd.py).

  python train.py --config configs/base.py:tiny --workdir /tmp/run [--config.total_steps=100 ...]

Resumes automatically from the latest checkpoint in --workdir; Ctrl-C or SIGTERM saves and exits with status 130
or 143 (a second Ctrl-C exits at once, without saving; before the first step is done, e.g. while XLA compiles it,
there is nothing to save and the first signal exits at once).
"""

from __future__ import annotations

import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Training config file (configs/{base,mid,ode,ahd}.py[:tiny]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, merged export.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from helios_jax.errors import HeliosError
  from helios_jax.parallel.distributed import initialize_from_env
  from helios_jax.training.dispatch import train
  try:
    initialize_from_env()  # multi-host runs only (docs/scaling.md); before JAX touches a device
    out = train(flags.FLAGS.config, flags.FLAGS.workdir, progress=flags.FLAGS.progress)
  except HeliosError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  last = out["losses"][-1] if out["losses"] else float("nan")
  how = f" (stopped by {out['stopped_by']})" if out["stopped_by"] else ""
  workdir = flags.FLAGS.workdir
  print(f"steps {out['start_step']} -> {out['final_step']}{how}; last loss {last:.5f}; "
        f"trainable parameters {out['num_trainable']:,}")
  samples = os.path.join(workdir, "samples")
  if os.path.isdir(samples):
    print(f"validation samples: {samples}")
  if out["stopped_by"]:
    print(f"checkpoint of step {out['final_step']} saved in {workdir}; run the same command to resume",
          file=sys.stderr)
    # the shell's convention for a process ended by a signal: 128 + its number (130 Ctrl-C, 143 SIGTERM)
    return 128 + int(getattr(signal, out["stopped_by"]))
  return 0


if __name__ == "__main__":
  from helios_jax import runtime  # XLA flags (Triton GEMM off, NHWC convolutions): before any computation
  runtime.configure_xla()
  runtime.quiet_gpu_plugin_errors()
  app.run(main)
