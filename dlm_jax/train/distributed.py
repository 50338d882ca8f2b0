"""Multi-process start-up: `jax.distributed.initialize()` when dlm-jax runs as several processes.

TPU pods: automatic (every worker runs the same command; jax finds the coordinator). GPU / CPU hosts: the
coordinator comes from `--coordinator_address --num_processes --process_id` or the env vars
DLM_COORDINATOR_ADDRESS, DLM_NUM_PROCESSES, DLM_PROCESS_ID (set by launch/*.sh); DLM_CPU_COLLECTIVES=gloo selects
CPU collectives for local multi-process runs. After it, `jax.devices()` spans all processes, each process
feeds its slice of every global batch, only process 0 writes logs, and checkpoints are written collectively.
"""

from __future__ import annotations

import os

from dlm_jax.errors import UserError


def _is_multi_host_tpu() -> bool:
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or os.environ.get("DLM_DISTRIBUTED") == "1"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Initializes jax.distributed when asked to (flags/env) or on a multi-host TPU; returns whether it did."""
    address = coordinator_address or os.environ.get("DLM_COORDINATOR_ADDRESS")
    count = num_processes if num_processes is not None else os.environ.get("DLM_NUM_PROCESSES")
    index = process_id if process_id is not None else os.environ.get("DLM_PROCESS_ID")
    if not address and not _is_multi_host_tpu():
        return False
    import jax

    collectives = os.environ.get("DLM_CPU_COLLECTIVES")
    if collectives:
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    if not address:
        jax.distributed.initialize()
        return True
    if count is None or index is None:
        raise UserError("a multi-process run needs the coordinator address, the number of processes and this "
                        "process's id (--num_processes/--process_id or DLM_NUM_PROCESSES/DLM_PROCESS_ID)")
    try:
        count, index = int(count), int(index)
    except ValueError:
        raise UserError(f"num_processes={count!r} and process_id={index!r} must be integers") from None
    if not 0 <= index < count:
        raise UserError(f"process_id={index} must be in [0, num_processes={count})")
    jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)
    return True
