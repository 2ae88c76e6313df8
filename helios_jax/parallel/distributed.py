"""Multi-host start-up: ``jax.distributed.initialize`` from the environment, before JAX touches a device.

One process per host (each sees its local GPUs); after start-up ``jax.devices()`` lists every host's devices and
the training mesh spans all of them. Three ways to start, checked in this order:

* explicit: ``JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=<0..3>``
  (optionally ``JAX_LOCAL_DEVICE_IDS=0,1,...``; JAX reads that one itself);
* SLURM (``srun``, more than one task) or Open MPI (``mpirun``): JAX's own cluster detection;
* otherwise a single process (one host with any number of GPUs needs no start-up).
"""

from __future__ import annotations

import os

import jax

from helios_jax.errors import InputError


def requested() -> str | None:
  """``"explicit"``, ``"cluster"`` or None: how the environment asks for a multi-process run."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "explicit"
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 or "OMPI_MCA_orte_hnp_uri" in os.environ:
    return "cluster"
  return None


def initialize_from_env() -> bool:
  """Calls ``jax.distributed.initialize`` when :func:`requested`; returns whether it did."""
  how = requested()
  if how is None:
    return False
  if how == "explicit":
    try:
      n, pid = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
    except (KeyError, ValueError) as e:
      raise InputError("JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers "
                       f"too ({e})") from e
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"], num_processes=n,
                               process_id=pid)
  else:
    jax.distributed.initialize()
  return True
