"""Process-group set-up under SLURM: one SLURM task per GPU, env exported before Accelerate.

``Accelerator()`` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR``;
SLURM sets ``SLURM_*``. Inside a submitit job we export submitit's torch-distributed
environment first (never torchrun inside submitit).
"""

from __future__ import annotations

import logging
import os
import zlib

log = logging.getLogger(__name__)

#: Rendezvous ports are drawn from [low, high): below Linux's default ephemeral range (32768-60999), where
#: outgoing connections take their local ports, so a busy node does not already hold the job's port.
MASTER_PORT_RANGE = (20000, 32768)


def master_port(job_id: str) -> int:
    """The job's rendezvous port: the same on every task (a hash of the SLURM job id), never ephemeral."""
    low, high = MASTER_PORT_RANGE
    return low + zlib.crc32(job_id.encode()) % (high - low)


def in_submitit_job() -> bool:
    return "SUBMITIT_EXECUTOR" in os.environ and "SLURM_JOB_ID" in os.environ


def export_torch_distributed_env() -> dict[str, str]:
    """Export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from a submitit SLURM job.

    No-op outside submitit, when the variables are already set (torchrun, accelerate
    launch), or for a single-task job: with ``LOCAL_RANK`` set, Accelerate would open a
    one-process gloo group whose TCP store binds ``MASTER_PORT``, a port submitit draws
    from the job id inside the kernel's ephemeral range, so co-scheduled jobs could fail
    with EADDRINUSE for no benefit. Multi-task jobs get :func:`master_port` unless
    ``MASTER_PORT`` is already set. Returns what was exported.
    """
    if not in_submitit_job() or "RANK" in os.environ:
        return {}
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    job = JobEnvironment()
    if job.num_tasks == 1:
        log.debug("single-task SLURM job: no torch.distributed process group")
        return {}
    env = TorchDistributedEnvironment()
    if "MASTER_PORT" not in os.environ:  # submitit's own draw spans 20000-60000, mostly ephemeral ports
        env.master_port = master_port(str(job.job_id))
    # overwrite: a MASTER_PORT the user set is kept (env read it); RANK was checked absent above
    env.export(set_cuda_visible_devices=False, overwrite=True)
    exported = {
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    }
    log.info("exported torch.distributed env from SLURM: %s", exported)
    return exported
