"""Multi-process start-up: `jax.distributed.initialize()` when dlm-jax runs as several processes.

TPU pods: automatic (every worker runs the same command; jax finds the coordinator). GPU / CPU hosts: the
coordinator comes from `--coordinator_address --num_processes --process_id` or the env vars
DLM_COORDINATOR_ADDRESS, DLM_NUM_PROCESSES, DLM_PROCESS_ID (set by launch/*.sh); DLM_CPU_COLLECTIVES=gloo selects
CPU collectives for local multi-process runs. After it, `jax.devices()` spans all processes, each process
feeds its slice of every global batch, only process 0 writes logs, and checkpoints are written collectively.
"""

from __future__ import annotations

import os
import platform
import sys

from dlm_jax.errors import UserError

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def relaunch_with_huge_pages() -> None:
    """Re-executes this process, same command line, with glibc's malloc on transparent huge pages (Linux + glibc).

    XLA:CPU's temporaries are allocated and freed every step; glibc maps them fresh each time and the kernel faults
    them in 4 KiB at a time (~100k faults per train step of the quickstart model). With GLIBC_TUNABLES
    glibc.malloc.hugetlb=1 they come in 2 MiB pages: the same step 1.3-1.6x faster on CPU, results bitwise unchanged
    (benchmarks/host_malloc.py; beside another memory-heavy process taking turns on the cores a large model's step
    was slower: docs/benchmarks.md). A GLIBC_TUNABLES that already names glibc.malloc.hugetlb (=0 to opt out) is
    kept as it is; a failed exec leaves the process running as it was.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if not sys.platform.startswith("linux") or "glibc.malloc.hugetlb" in tunables or platform.libc_ver()[0] != "glibc":
        return
    os.environ["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, HUGE_PAGES_TUNABLE) if t)
    try:
        os.execv(sys.executable, sys.orig_argv)
    except OSError:
        os.environ["GLIBC_TUNABLES"] = tunables


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
