"""Hydra callback that makes a multirun one tracked experiment: parent run, job status, summary.

Where each hook runs, and why it does what it does:

* ``on_multirun_start`` (submitting host, before any job): migrates the MLflow database and creates
  the experiment once (parallel jobs never race on a fresh SQLite file), refuses or warns about a
  dirty git tree for scheduler sweeps (queued jobs import whatever code is on disk when they start),
  and opens the sweep's parent run, recorded in ``<sweep>/.genattr/parent.json`` for the jobs.
* ``on_job_start`` / ``on_job_end`` (the compute node, every job, every rank): rank 0 writes the
  job's ``job_status.json``; a failed job gets a ``FAILED`` file with the traceback, its MLflow run
  marked FAILED with the Hydra log and the submitit stdout/stderr attached -- and if it died before
  its run existed (a config error), a FAILED child run is created so no failure is invisible.
* ``on_multirun_end`` -- or interpreter exit, since Hydra 1.3 raises out of the sweep when a job
  failed and never calls that hook -- prints the job -> status -> run id table, stores it in the
  sweep dir and on the parent run, and closes the parent run FAILED if any job did not complete.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from genattr.tracking import sweep

log = logging.getLogger(__name__)


def _mlflow_tracker(config: DictConfig) -> Any | None:
    """The configured MLflow tracker, or ``None`` with ``tracking=none``."""
    from genattr.config import register_resolvers
    from genattr.utils.instantiate import build

    register_resolvers()
    node = config.get("tracking")
    if node is None or "_target_" not in node or not str(node._target_).endswith("MLflowTracker"):
        return None
    return build(node)


def _submitit_logs() -> list[Path]:
    """stdout/stderr files of the current submitit task (empty outside submitit)."""
    if "SUBMITIT_FOLDER" not in os.environ:
        return []
    try:
        import submitit

        paths = submitit.JobEnvironment().paths
        return [p for p in (paths.stdout, paths.stderr) if p.is_file()]
    except Exception as exc:  # noqa: BLE001 - logs are a courtesy; never fail the job over them
        log.debug("no submitit log paths: %s", exc)
        return []


def _slurm_facts() -> dict[str, Any]:
    return {
        "slurm_job_id": os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID")),
        "slurm_array_task": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "host": socket.gethostname(),
    }


class SweepTracking(Callback):
    """See the module docstring. Registered in ``conf/hydra/default.yaml``."""

    def __init__(self, strict_git: bool | None = None) -> None:
        """``strict_git`` overrides the config's top-level ``strict_git`` (for tests)."""
        self.strict_git = strict_git
        self._sweep_dir: Path | None = None
        self._config: DictConfig | None = None
        self._finished = False

    # -- submitting host -------------------------------------------------------------------------
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from genattr.utils.git import git_info

        self._sweep_dir = Path(str(config.hydra.sweep.dir))
        self._config = config
        launcher = str(config.hydra.launcher.get("_target_", ""))
        root = str(config.paths.root_dir)
        git = git_info(root)
        strict = bool(config.get("strict_git", False)) if self.strict_git is None else self.strict_git
        if launcher.endswith(sweep.SCHEDULER_LAUNCHERS) and git["git_dirty"] == "true":
            message = (
                f"the git tree at {root} has uncommitted changes; queued SLURM jobs import the code on disk when "
                "they start, so commit first"
            )
            if strict:
                log.error("%s (strict_git=true refuses the sweep).", message)
                raise SystemExit(1)
            log.warning("%s, or pass strict_git=true to refuse such sweeps. Recording the dirty flag.", message)
        tracker = _mlflow_tracker(config)
        record: dict[str, Any] = {
            "sweep_dir": str(self._sweep_dir),
            "started_at": time.time(),
            "launcher": launcher,
            "overrides": list(config.hydra.overrides.task),
            **git,
        }
        if tracker is not None:
            experiment_id = tracker.ensure_experiment()
            name = f"sweep-{self._sweep_dir.name}"
            tags = {
                "genattr.sweep": "parent",
                "sweep_dir": str(self._sweep_dir),
                "overrides": " ".join(config.hydra.overrides.task)[:5000],
                "launcher": launcher.rsplit(".", 1)[-1],
                **git,
            }
            tracker.start(run_name=name, tags=tags, params={})
            record |= {
                "parent_run_id": tracker.run_id,
                "tracking_uri": tracker.tracking_uri,
                "experiment": tracker.experiment,
                "experiment_id": experiment_id,
            }
            log.info("MLflow parent run %s for the sweep in %s", tracker.run_id, self._sweep_dir)
        sweep.write_parent(self._sweep_dir, record)
        atexit.register(self._finish)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish()

    def _finish(self) -> None:
        """Summary table + parent run status; runs once, from the hook or at interpreter exit."""
        if self._finished or self._sweep_dir is None:
            return
        self._finished = True
        rows = sweep.collect(self._sweep_dir)
        table = sweep.format_table(rows)
        failed = [r for r in rows if r.get("status") != "COMPLETED"]
        text = f"sweep {self._sweep_dir}: {len(rows) - len(failed)}/{len(rows)} jobs completed\n{table}\n"
        print(text, flush=True)
        (self._sweep_dir / sweep.STATE_DIR).mkdir(parents=True, exist_ok=True)
        summary = self._sweep_dir / sweep.STATE_DIR / "summary.txt"
        summary.write_text(text)
        parent = (sweep.read_parent(self._sweep_dir) or {}) | {"jobs": rows}
        sweep.write_parent(self._sweep_dir, parent)
        if self._config is None or not parent.get("parent_run_id"):
            return
        try:
            tracker = _mlflow_tracker(self._config)
            tracker.start(run_name="", tags={}, params={}, run_id=parent["parent_run_id"])
            tracker.log_artifact(summary, "sweep")
            tracker.set_tags({"jobs_completed": str(len(rows) - len(failed)), "jobs_total": str(len(rows))})
            tracker.end("FAILED" if failed or not rows else "FINISHED")
        except Exception as exc:  # noqa: BLE001 - the table is printed; never mask the sweep's own error
            log.warning("could not close the MLflow parent run %s: %s", parent["parent_run_id"], exc)

    # -- compute node ----------------------------------------------------------------------------
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if sweep.current_sweep_dir() is None or sweep.process_rank() != 0:
            return
        job_dir = Path(str(config.hydra.runtime.output_dir))
        job_dir.mkdir(parents=True, exist_ok=True)
        sweep.write_job_status(job_dir, self._job_record(config, "RUNNING"))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if sweep.current_sweep_dir() is None or sweep.process_rank() != 0:
            return
        job_dir = Path(str(config.hydra.runtime.output_dir))
        status = job_return.status.name  # COMPLETED | FAILED
        record = self._job_record(config, status)
        error = job_return._return_value if status == "FAILED" else None  # .return_value would re-raise
        if error is not None:
            record["error"] = f"{type(error).__name__}: {error}"
            trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            (job_dir / "FAILED").write_text(trace)
        info = sweep.read_json(job_dir / sweep.RUN_INFO_FILE) or {}
        record["run_id"] = info.get("mlflow_run_id")
        try:
            record["run_id"] = self._attach_logs(config, job_dir, record, info)
        except Exception as exc:  # noqa: BLE001 - tracking trouble must not turn into a second failure
            log.warning("could not attach the job logs to MLflow: %s", exc)
        sweep.write_job_status(job_dir, record)

    def _job_record(self, config: DictConfig, status: str) -> dict[str, Any]:
        return {
            "job": str(config.hydra.job.num),
            "status": status,
            "overrides": list(config.hydra.overrides.task),
            "output_dir": str(config.hydra.runtime.output_dir),
            "updated_at": time.time(),
            **_slurm_facts(),
        }

    def _attach_logs(
        self, config: DictConfig, job_dir: Path, record: dict[str, Any], info: dict[str, Any]
    ) -> str | None:
        """Hydra + submitit logs onto the job's run; a FAILED child run when the job had none yet."""
        tracker = _mlflow_tracker(config)
        if tracker is None:
            return info.get("mlflow_run_id")
        failed = record["status"] == "FAILED"
        run_id = info.get("mlflow_run_id")
        if run_id is None and not failed:
            return None
        logs = [job_dir / f"{config.hydra.job.name}.log", job_dir / "FAILED", *_submitit_logs()]
        logs = [path for path in logs if path.is_file() and path.stat().st_size]
        if run_id is None:  # died before genattr.run opened its run (e.g. a config error)
            parent = sweep.read_parent(sweep.current_sweep_dir()) or {}
            tags = {
                "overrides": " ".join(record["overrides"])[:5000],
                "output_dir": str(job_dir),
                "error": record.get("error", "")[:5000],
            }
            task = OmegaConf.select(config, "task_name", default="job", throw_on_resolution_failure=False)
            name = f"{task}-job{record['job']}"
            tracker.start(run_name=name, tags=tags, params={}, parent_run_id=parent.get("parent_run_id"))
            for path in logs:
                tracker.log_artifact(path, "logs")
            tracker.end("FAILED")
            return tracker.run_id
        # the run exists and genattr.run already closed it (FINISHED, KILLED or FAILED): add, don't reopen
        client = tracker.client
        for path in logs:
            client.log_artifact(run_id, str(path), "logs")
        if failed:
            client.set_tag(run_id, "error", record.get("error", "")[:5000])
            if client.get_run(run_id).info.status != "FAILED":
                client.set_terminated(run_id, status="FAILED")
        return run_id
