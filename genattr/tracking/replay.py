"""``python -m genattr.tracking.replay <run dir> [--patience S]``: deliver the tracking calls a run spooled while
its MLflow server was unreachable (``<run dir>/mlflow_spool.jsonl``), in order, into the run's MLflow run."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from genattr.tracking import sweep
from genattr.tracking.mlflow import MLflowTracker
from genattr.tracking.spool import SPOOL_FILE
from genattr.utils.io import atomic_write_json


def replay(run_dir: Path, patience_s: float = 60.0) -> int:
    """Replay ``run_dir``'s spool; return how many calls are still waiting (0 = all delivered)."""
    info_file = run_dir / sweep.RUN_INFO_FILE
    if not (run_dir / SPOOL_FILE).is_file():
        print(f"{run_dir / SPOOL_FILE} does not exist: nothing to replay")
        return 0
    if not info_file.is_file():
        raise SystemExit(f"{info_file} does not exist: is {run_dir} a genattr run folder?")
    info = json.loads(info_file.read_text())
    tracker = MLflowTracker(info["tracking_uri"], experiment=info.get("experiment") or "genattr")
    tracker.run_id = info.get("mlflow_run_id")
    tracker.attach_spool(run_dir / SPOOL_FILE)
    tracker.flush(patience_s)
    if tracker.run_id and tracker.run_id != info.get("mlflow_run_id"):
        atomic_write_json(info_file, {**info, "mlflow_run_id": tracker.run_id})
    left = len(tracker.spool)
    print(f"{'all calls delivered' if not left else f'{left} calls still waiting'}: {tracker.describe()}")
    return left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--patience", type=float, default=60.0, help="seconds to wait for the server")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return 1 if replay(args.run_dir, args.patience) else 0


if __name__ == "__main__":
    sys.exit(main())
