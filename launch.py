"""Entry point: ``python launch.py [-m] method=... data=... key=value ...``."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from genattr.config import register_resolvers
from genattr.tracking.sweep import current_sweep_dir
from genattr.utils.errors import GenattrError

register_resolvers()
log = logging.getLogger("genattr")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from genattr.run import run

    try:
        report = run(cfg)
    except GenattrError as err:
        log.debug("error details", exc_info=True)
        log.error("%s", err)
        if current_sweep_dir() is not None:
            # in a multirun the error must reach Hydra: it marks this job FAILED (and the sweep table
            # names the error) instead of SystemExit killing the whole sweep or a SLURM job silently
            raise
        raise SystemExit(1) from None
    return report.metrics.get("final/aaf")


if __name__ == "__main__":
    main()
