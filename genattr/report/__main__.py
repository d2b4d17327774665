"""``python -m genattr.report <sweep dir | experiment name>``: ablation table + plots from MLflow.

Writes ``report.md``, ``report.csv`` and one bar chart per metric (mean ± std over seeds, one bar
per method, grouped by dataset) into ``--out`` (default: ``<sweep dir>/report`` or
``reports/<experiment>``) and, for a sweep, logs them to the sweep's parent MLflow run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from genattr.report.runs import project_root, select
from genattr.report.table import default_metrics, group_runs, mean_std, to_csv, to_markdown
from genattr.tracking.plots import plot_ablation_bars
from genattr.utils.errors import GenattrError

log = logging.getLogger("genattr.report")


def build_report(
    target: str,
    *,
    metrics: list[str] | None = None,
    out: Path | None = None,
    tracking_uri: str | None = None,
    log_to_parent: bool = True,
) -> Path:
    """Write the report of ``target`` and return the Markdown file."""
    selection = select(target, tracking_uri)
    if not selection.runs:
        raise GenattrError(f"no MLflow runs found for {target!r} at {selection.tracking_uri}")
    names = metrics or default_metrics(selection.runs)
    if not names:
        raise GenattrError(f"the runs of {target!r} have no final/* metrics; name some with --metrics")
    groups = group_runs(selection.runs, names)
    if out is None:
        out = selection.sweep_dir / "report" if selection.sweep_dir else project_root() / "reports" / selection.label
    out.mkdir(parents=True, exist_ok=True)
    markdown = out / "report.md"
    markdown.write_text(to_markdown(groups, names, f"Ablation report: {selection.label}"))
    files = [markdown, to_csv(groups, names, out / "report.csv")]
    for metric in names:
        bars = {(g.data, g.method): mean_std(g.values[metric]) for g in groups if g.values.get(metric)}
        if bars:
            files.append(plot_ablation_bars(bars, metric, out / f"{metric.replace('/', '_')}.png"))
    if log_to_parent and selection.parent_run_id:
        for path in files:
            selection.client.log_artifact(selection.parent_run_id, str(path), "report")
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genattr.report", description=__doc__.splitlines()[0])
    parser.add_argument("target", help="a sweep dir (multirun/...) or an MLflow experiment name")
    parser.add_argument("--metrics", nargs="+", help="metric keys (default: every final/* metric)")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--tracking-uri", help="MLflow URI (default: the sweep's, or MLFLOW_TRACKING_URI)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to the sweep's parent run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = build_report(
            args.target,
            metrics=args.metrics,
            out=args.out,
            tracking_uri=args.tracking_uri,
            log_to_parent=not args.no_log,
        )
    except GenattrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path.read_text())
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
