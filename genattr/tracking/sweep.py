"""Files that tie a multirun's jobs together: the parent MLflow run, one status file per job.

Why files in the sweep dir rather than environment variables or in-memory state: a SLURM job runs
on another host, may be requeued hours later and may run under another process tree, but it always
sees the sweep dir (Hydra and submitit already require it to be on a shared filesystem). So the
submitting host writes ``<sweep>/.genattr/parent.json`` before any job starts, every job reads it
to tag its MLflow run with ``mlflow.parentRunId``, and every job leaves ``job_status.json`` in its
own folder, from which the end-of-sweep table is built even when jobs failed or were requeued.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from genattr.utils.io import atomic_write_json

STATE_DIR = ".genattr"
PARENT_FILE = "parent.json"
JOB_STATUS_FILE = "job_status.json"
#: Written by ``genattr.run`` into every output dir as soon as the MLflow run exists.
RUN_INFO_FILE = "run_info.json"
#: The ``hydra.launcher`` targets that submit to a scheduler (where a dirty tree really bites).
SCHEDULER_LAUNCHERS = ("SlurmLauncher",)


def process_rank() -> int:
    """Global rank of this process in a multi-task job (0 outside one); callbacks run in every task."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def current_sweep_dir() -> Path | None:
    """The sweep dir of the Hydra multirun this process belongs to, or ``None`` for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return Path(str(hc.sweep.dir))


def write_parent(sweep_dir: Path, info: Mapping[str, Any]) -> Path:
    path = Path(sweep_dir) / STATE_DIR / PARENT_FILE
    atomic_write_json(path, dict(info))
    return path


def read_parent(sweep_dir: Path | None) -> dict[str, Any] | None:
    """The parent-run record of a sweep, or ``None`` (single run, tracking off, or an old sweep)."""
    if sweep_dir is None:
        return None
    path = Path(sweep_dir) / STATE_DIR / PARENT_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def read_json(path: Path) -> dict[str, Any] | None:
    """A small JSON record, or ``None`` when it is missing or was cut short by a killed job."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_job_status(job_dir: Path, record: Mapping[str, Any]) -> None:
    atomic_write_json(Path(job_dir) / JOB_STATUS_FILE, dict(record))


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job folders of a sweep, in job-number order (the folders that hold Hydra's ``.hydra/``)."""
    found = [p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/overrides.yaml")]
    return sorted(found, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job: its status record, or ``UNKNOWN`` for a job that left none (killed hard)."""
    rows = []
    for folder in job_dirs(sweep_dir):
        record = read_json(folder / JOB_STATUS_FILE) or {"status": "UNKNOWN"}
        info = read_json(folder / RUN_INFO_FILE) or {}
        record.setdefault("run_id", info.get("mlflow_run_id"))
        record.setdefault("job", folder.name)
        record.setdefault("output_dir", str(folder))
        rows.append(record)
    return rows


def format_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """The end-of-sweep table: job -> status -> MLflow run id -> overrides (and the error, if any)."""
    rows = list(rows)
    header = ("job", "status", "run id", "restarts", "overrides", "error")
    lines = [header]
    # the overrides every job shares say nothing about which job is which: show the differing ones
    shared = set.intersection(*(set(r.get("overrides") or []) for r in rows)) if len(rows) > 1 else set()
    for row in rows:
        lines.append(
            (
                str(row.get("job", "?")),
                str(row.get("status", "UNKNOWN")),
                str(row.get("run_id") or "-"),
                str(row.get("restarts", 0)),
                " ".join(o for o in row.get("overrides") or [] if o not in shared) or "-",
                (str(row.get("error") or "")[:120] or "-").replace("\n", " "),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)
