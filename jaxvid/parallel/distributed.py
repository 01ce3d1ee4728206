"""Several hosts: `jax.distributed.initialize`, JAX's own multi-process runtime (no launcher of ours).

Start one process per host (or per GPU) with your cluster's launcher (SLURM, Kubernetes, `mpirun`,
plain ssh) and call `initialize_distributed()` before anything touches a device. On SLURM and
other clusters jax detects the coordinator, the process count and the process id by itself;
elsewhere pass them (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, which jax
reads). After it, `jax.devices()` lists every host's GPUs and `make_mesh()` spans them all.
"""
from __future__ import annotations

import logging

import jax

__all__ = ["initialize_distributed"]

log = logging.getLogger(__name__)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join the multi-host job (a thin call of `jax.distributed.initialize`); logs the devices it sees.

    coordinator_address: "host:port" of process 0; None = from the environment / cluster.
    Must run before the first computation; raises jax's own error when called twice.
    """
    if num_processes is not None and (not isinstance(num_processes, int) or num_processes < 1):
        raise ValueError(f"num_processes={num_processes!r}; expected a positive integer or None")
    if process_id is not None and (not isinstance(process_id, int) or process_id < 0):
        raise ValueError(f"process_id={process_id!r}; expected an integer >= 0 or None")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
