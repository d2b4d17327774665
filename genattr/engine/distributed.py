"""Process-group set-up under SLURM: one SLURM task per GPU, env exported before Accelerate.

``Accelerator()`` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR``;
SLURM sets ``SLURM_*``. Inside a submitit job we export submitit's torch-distributed
environment first (never torchrun inside submitit).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def in_submitit_job() -> bool:
    return "SUBMITIT_EXECUTOR" in os.environ and "SLURM_JOB_ID" in os.environ


def export_torch_distributed_env() -> dict[str, str]:
    """Export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from a submitit SLURM job.

    No-op outside submitit, when the variables are already set (torchrun, accelerate
    launch), or for a single-task job: with ``LOCAL_RANK`` set, Accelerate would open a
    one-process gloo group whose TCP store binds ``MASTER_PORT``, a port submitit draws
    from the job id inside the kernel's ephemeral range, so co-scheduled jobs could fail
    with EADDRINUSE for no benefit. Returns what was exported.
    """
    if not in_submitit_job() or "RANK" in os.environ:
        return {}
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks == 1:
        log.debug("single-task SLURM job: no torch.distributed process group")
        return {}

    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    exported = {
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    }
    log.info("exported torch.distributed env from SLURM: %s", exported)
    return exported
