"""Results never depend on the cache state: every family's twin run gives the same results.json (wall-clock times
and the count of retrains trained in-process aside) on an empty cache (twins, twin-pretrained backbones, retrains
and features built in-process) and again on the warm cache it left.

Each family's small run (``SMALL`` of ``test_engine_families.py``) is made cheaper to build from nothing (tiny twin
generators and pretraining) and pointed at a fresh cache folder, run twice in one process, and compared.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose_config
from helpers.results import comparable
from test_engine_families import SMALL

from genattr.run import run

pytestmark = pytest.mark.slow

#: what makes each family's twin cheap to build from an empty cache (it is built twice per CI run otherwise once)
COLD: dict[str, list[str]] = {
    "forgetting": ["model.twin_pretrain.epochs=2", "data.twin.n_train=12", "data.twin.n_test=6"],
    "continual": ["model.twin_pretrain.steps=5", "model.twin_pretrain.n_images=64"],
    "tracing": ["data.twin.n_proc=32", "data.twin.tok_steps=10", "data.twin.gen_steps=20", "data.twin.n_test=24"],
    "detection": [],
    "attribution": ["method.cache_dir=${paths.cache_dir}/unlearn"],
}


@pytest.mark.parametrize("family", sorted(SMALL))
def test_a_cold_cache_and_a_warm_one_give_the_same_results(family: str, tmp_path: Path) -> None:
    ov = [*SMALL[family], *COLD[family], f"paths.cache_dir={tmp_path / 'cache'}", "tracking=none"]
    results = []
    for name in ("cold", "warm"):
        report = run(compose_config(ov, tmp_path / name), overrides=ov)
        assert report.completed
        results.append(comparable(json.loads((tmp_path / name / "results.json").read_text())))
    assert any((tmp_path / "cache").iterdir())  # the cold run built what the warm one found
    assert results[0] == results[1]
