"""``python -m genattr.bench lorax`` writes every path's figures for every T, and the T = N summary the README
quotes (skipping old adapters' backward; batched experts against sequential ones). Shape only, never timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from genattr.bench.__main__ import main

PATHS = ("sequential", "reference_grad", "batched")


def test_bench_lorax_reports_every_path_and_the_batched_experts_figures(tmp_path: Path) -> None:
    out = tmp_path / "lorax.json"
    args = ["lorax", "--img-size", "32", "--batch", "2", "--tasks", "3", "--repeats", "1", "--warmup", "0"]
    assert main([*args, "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["benchmark"] == "lorax" and res["device"] == "cpu" and "bf16" not in res
    rows = res["fp32"]
    assert [r["tasks"] for r in rows] == [1, 2, 3]
    for row in rows:
        for path in PATHS:
            assert row[f"train_img_s_{path}"] > 0 and row[f"train_peak_mem_mb_{path}"] > 0
        assert row["eval_img_s_sequential"] > 0 and row["eval_img_s_batched"] > 0
        # the bench asserts the paths agree before timing them; the losses it compared are reported
        assert row["loss_batched"] == pytest.approx(row["loss_sequential"], rel=1e-5)
        assert row["loss_reference_grad"] == pytest.approx(row["loss_sequential"], rel=1e-5)
        assert row["speedup_train"] == row["train_img_s_sequential"] / row["train_img_s_reference_grad"]
        assert row["speedup_eval_batched"] == row["eval_img_s_batched"] / row["eval_img_s_sequential"]
        assert row["speedup_train_batched"] == row["train_img_s_batched"] / row["train_img_s_sequential"]
    summary = res["summary"]
    assert summary["speedup_train_T3"] == rows[-1]["speedup_train"]
    assert summary["speedup_eval_batched_T3"] == rows[-1]["speedup_eval_batched"]
    assert summary["speedup_train_batched_T3"] == rows[-1]["speedup_train_batched"]
    assert summary["ceiling_speedup_train"] == 1.5
    assert len(res["load_avg_1m"]) == 2
