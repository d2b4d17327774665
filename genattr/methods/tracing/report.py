"""The model tracer's report once every stage ran: metrics per labelled split, ``results.json``, the submission
CSV, confusion matrices and per-family score histograms (the files from the main process only)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from genattr.data.rarvar import FAMILIES, FAMILY_OF, LABELS, OUTLIER
from genattr.methods.base import Report
from genattr.methods.tracing.outputs import plot_confusion, plot_histograms, write_submission
from genattr.metrics.tracing import confusion, tracing_metrics

if TYPE_CHECKING:
    from genattr.methods.tracing.pipeline import TracerPipeline

SPLITS = ("train", "val", "test")
#: the stage details results.json carries when a stage wrote them
DETAILS = ("inverse", "stage1", "prada", "classifier_loss")


def tracer_report(pipe: TracerPipeline) -> Report:
    settings, protocol, meta = pipe.settings, pipe.protocol, pipe.state.meta
    preds = pipe.predict()
    out = pipe.ctx.output_dir
    main = pipe.acc.is_main_process
    results: dict[str, Any] = {
        "method": settings.name,
        "pipeline": settings.pipeline,
        "data": protocol.name,
        "data_source": protocol.source,
        "seed": settings.seed,
        "class_source": settings.class_source,
        "timings_s": meta["timings"],
        "resumed_stages": pipe.resumed,
        "counts": {s: len(protocol.split(s)) for s in SPLITS},
    }
    metrics: dict[str, float] = {}
    artifacts: list[Path] = []
    for s in ("val", "test"):
        sp = protocol.split(s)
        if not sp.labels:
            continue
        m = tracing_metrics(sp.labels, preds[s], family_of=FAMILY_OF, outlier=OUTLIER)
        results[s] = m
        results[f"{s}_confusion"] = confusion(sp.labels, preds[s], LABELS).tolist()
        metrics.update({f"{s}/{k}": v for k, v in m.items() if not k.startswith("n")})
        if main:
            title = f"{settings.pipeline} — {s}"
            artifacts.append(
                plot_confusion(confusion(sp.labels, preds[s], LABELS), out / "plots" / f"confusion_{s}.png", title)
            )
    results["diagnostics"] = pipe.diagnostics()
    results["stage_details"] = {k: meta[k] for k in DETAILS if k in meta}
    results["per_process"] = pipe.per_process()
    if main:
        artifacts.append(write_submission(out / "submission.csv", protocol.test.names, preds["test"]))
        artifacts += histograms(pipe, out)
    head = results.get("test") or results.get("val") or {}
    nan = float("nan")
    summary = (
        f"{settings.name} ({settings.pipeline}) on {protocol.name} [{protocol.source}]: "
        f"accuracy {head.get('accuracy', nan):.1f}%, family {head.get('family_accuracy', nan):.1f}%, "
        f"variant|family {head.get('variant_accuracy', nan):.1f}%; submission {out / 'submission.csv'}"
    )
    return Report(metrics, results, artifacts, summary)


def histograms(pipe: TracerPipeline, out: Path) -> list[Path]:
    """Per family and labelled split: the pipeline's family score, one histogram per true family / outliers."""
    paths = []
    for s in pipe.labelled_splits():
        true = np.asarray([FAMILY_OF[x] for x in pipe.protocol.split(s).labels])
        for fi, f in enumerate(FAMILIES):
            v, xlabel = pipe.histogram(s, fi)
            groups = {g: v[true == g] for g in (*FAMILIES, OUTLIER)}
            path = out / "plots" / f"scores_{f}_{s}.png"
            paths.append(plot_histograms(groups, list(groups), path, f"{f} — {s}", xlabel))
    return paths
