"""Prediction dumps in AI-GenBench's ``.npz`` layout, and the window plots made from them.

The keys follow the original ``predictions_dump`` merge (``specs/aigenbench.md`` 3), so its
offline analysis scripts read our files: ``fused_*`` per image, ``crop_*`` per crop,
``identifier`` (= row ``ID`` within the split), ``generator_id_to_name``,
``windows_timeline`` and ``pairing`` (per identifier: the generator a real image is paired
with, -1 for fakes). ``crop_to_image_index`` here indexes the ``fused_*`` arrays (the
original's was batch-local); ``file_id`` is added as the stable key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from genattr.data.aigenbench.dataset import DetectionProtocol
from genattr.metrics.detection import roc_curve
from genattr.tracking.plots import plot_roc_curves, plot_window_heatmap

FILE = "predictions_validate_all.npz"


def dump_predictions(folder: Path, protocol: DetectionProtocol, pred: Mapping[str, np.ndarray]) -> Path:
    """Write one window's validation predictions; returns the file (written atomically)."""
    val = protocol.validation
    pos = np.asarray(pred["position"])
    crop_pos = np.asarray(pred["crop_position"])
    ids = val.rows[pos]
    width = max(len(w) for w in protocol.timeline.windows)
    timeline = np.array([list(w) + [""] * (width - len(w)) for w in protocol.timeline.windows], dtype=str)
    arrays: dict[str, Any] = {
        "fused_scores": np.asarray(pred["fused_scores"], dtype=np.float32),
        "fused_labels": val.labels[pos].astype(np.int64),
        "fused_generator_ids": val.generator_ids[pos].astype(np.int64),
        "fused_identifiers": ids.astype(np.int64),
        "fused_losses": np.asarray(pred["fused_losses"], dtype=np.float32),
        "crop_scores": np.asarray(pred["crop_scores"], dtype=np.float32),
        "crop_labels": val.labels[crop_pos].astype(np.int64),
        "crop_generator_ids": val.generator_ids[crop_pos].astype(np.int64),
        "crop_identifiers": val.rows[crop_pos].astype(np.int64),
        "crop_losses": np.asarray(pred["crop_losses"], dtype=np.float32),
        "crop_to_image_index": np.searchsorted(pos, crop_pos).astype(np.int64),
        "identifier": ids.astype(np.int64),
        "generator_id_to_name": np.array(protocol.timeline.id_to_name, dtype=str),
        "windows_timeline": timeline,
        "pairing": protocol.pairing[pos].astype(np.int64),
        "file_id": np.array([val.file_ids[i] for i in pos], dtype=str),
    }
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{FILE}.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    tmp.replace(folder / FILE)
    return folder / FILE


def load_predictions(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / FILE, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def window_plots(
    folder: Path,
    protocol: DetectionProtocol,
    per_window: Sequence[Mapping[str, Any]],
    preds: Mapping[int, Mapping[str, np.ndarray]],
    *,
    title: str,
) -> list[Path]:
    """Next-Period ROC per window, Growing ROC of the last window, window x generator AUROC heatmap."""
    tl = protocol.timeline
    gen_ids = {tl.generator_id(g): k for k, w in enumerate(tl.windows) for g in w}
    curves_next: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for row in per_window:
        k = int(row["window"])
        if row["next_is_fallback"] or k not in preds:
            continue
        p = preds[k]
        wanted = [i for i, w in gen_ids.items() if w == k + 1]
        mask = np.isin(p["fused_generator_ids"], wanted) | ((p["fused_labels"] == 0) & np.isin(p["pairing"], wanted))
        fpr, tpr = roc_curve(p["fused_labels"][mask], p["fused_scores"][mask])
        curves_next[f"after w{k} (AUROC {row['next']['auroc']:.3f})"] = (fpr, tpr)
    out = [plot_roc_curves(curves_next, folder / "roc_next_period.png", f"Next-Period ROC\n{title}")]
    last = per_window[-1]
    if int(last["window"]) in preds:
        p = preds[int(last["window"])]
        fpr, tpr = roc_curve(p["fused_labels"], p["fused_scores"])
        out.append(
            plot_roc_curves(
                {f"all generators (AUROC {last['all']['auroc']:.3f})": (fpr, tpr)},
                folder / "roc_final_all.png",
                f"ROC after the last window\n{title}",
            )
        )
    heat = np.array([[row["per_generator_auroc"][g] for g in tl.generators] for row in per_window], dtype=float)
    out.append(
        plot_window_heatmap(
            heat,
            [f"w{row['window']}" for row in per_window],
            list(tl.generators),
            folder / "auroc_window_x_generator.png",
            f"AUROC per generator\n{title}",
            col_groups=[tl.window_of(g) for g in tl.generators],
        )
    )
    return out
