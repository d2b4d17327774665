"""The continual-learning figures render to non-empty PNGs without pyplot state."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from genattr.tracking.plots import plot_accuracy_matrix, plot_stage_curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ["gaugan", "biggan", "wild"]
R = np.array([[90.0, 80.0, 70.0], [0.0, 60.0, 50.0], [0.0, 0.0, 40.0]])


def test_plots_write_pngs(tmp_path: Path) -> None:
    before = plt.get_fignums()
    m = plot_accuracy_matrix(R, NAMES, tmp_path / "figs" / "R.png", title="easy")
    c = plot_stage_curve(
        {"lorax": [90.0, 70.0, 53.3], "partial": [80.0]},
        NAMES,
        tmp_path / "curve.png",
        "AA (%)",
    )
    for p in (m, c):
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert plt.get_fignums() == before


def test_shape_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plot_accuracy_matrix(R, NAMES[:2], tmp_path / "x.png")
    with pytest.raises(ValueError):
        plot_stage_curve({"a": [1.0, 2.0, 3.0, 4.0]}, NAMES, tmp_path / "y.png")
