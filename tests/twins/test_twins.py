"""The twins stand apart from the real code: chosen by ``data.twin._target_``, built before the protocol, read by
the real loaders, and nothing below them imports them (nor do metrics import data, or data import methods)."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from genattr.config import CONF_DIR
from genattr.run import build_protocol
from genattr.twins.materialize import materialize, twin_spec
from genattr.twins.spec import Twin

PACKAGE = Path(__file__).resolve().parents[2] / "genattr"
DATA_OPTIONS = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml") if not p.stem.startswith("_"))


def _imports(folder: Path) -> dict[str, set[str]]:
    """Every ``genattr.*`` module imported anywhere (also inside functions) by the modules under ``folder``."""
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        found[str(path.relative_to(PACKAGE.parent))] = {n for n in names if n.startswith("genattr")}
    return found


#: the Method / RunContext / Report contract (``methods/base.py``) is what the engine runs, not a family
CONTRACT = "genattr.methods.base"


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("data", ("genattr.twins", "genattr.methods", "genattr.engine", "genattr.run")),
        ("models", ("genattr.twins", "genattr.methods", "genattr.data", "genattr.run")),
        ("metrics", ("genattr.twins", "genattr.methods", "genattr.data", "genattr.models", "genattr.engine")),
        ("engine", ("genattr.twins", "genattr.methods", "genattr.run")),
        ("methods", ("genattr.twins", "genattr.run")),
    ],
)
def test_no_module_imports_upward_or_a_twin(layer: str, forbidden: tuple[str, ...]) -> None:
    bad = {
        module: wrong
        for module, names in _imports(PACKAGE / layer).items()
        if (wrong := sorted(n for n in names if n.startswith(forbidden) and n != CONTRACT))
    }
    assert not bad, f"genattr/{layer} imports what sits above it: {bad}"


def test_families_never_import_each_other() -> None:
    families = [p.name for p in (PACKAGE / "methods").iterdir() if p.is_dir() and not p.name.startswith("_")]
    for family in families:
        others = tuple(f"genattr.methods.{f}" for f in families if f != family)
        for module, names in _imports(PACKAGE / "methods" / family).items():
            assert not [n for n in names if n.startswith(others)], module


@pytest.mark.parametrize("option", DATA_OPTIONS)
def test_every_data_option_names_a_twin_whose_answers_are_its_own_keys(option: str, compose_cfg) -> None:
    cfg = compose_cfg([f"data={option}"])
    builder, params, cache = twin_spec(cfg.data)
    assert callable(builder) and "_target_" not in params and "cache_dir" not in params
    assert cache == Path(cfg.paths.cache_dir)
    assert OmegaConf.select(cfg, "data.cpu_profile") is not None and "cpu_profile_on_real_data" in cfg.data


def test_a_real_root_builds_no_twin(compose_cfg, tmp_path: Path) -> None:
    assert materialize(compose_cfg([f"data.root={tmp_path}"])) is None


def test_the_rarvar_twin_decides_its_own_image_size_and_checkpoints(compose_cfg) -> None:
    """Real data keeps 256 px and model=prada_real's checkpoint names; the twin's files answer both."""
    cfg = compose_cfg(["method=prada", "data=rarvar"])
    assert cfg.data.image_size == 256 and cfg.data.models is not None
    protocol = build_protocol(cfg)
    assert protocol.source == "twin" and protocol.image_size == 32
    assert protocol.info["twin"]["params"]["image_size"] == 32


def test_building_a_twin_leaves_the_run_s_random_streams_alone(compose_cfg, tmp_path: Path) -> None:
    """A cold cache (the twin is generated in-process) and a warm one must give the run the same numbers."""
    cfg = compose_cfg(["data=cddb_hard", f"data.twin.cache_dir={tmp_path}", "data.twin.n_train=6", "data.crop=32"])

    def draws() -> tuple[float, float, float]:
        return float(torch.rand(1)), float(np.random.rand()), random.random()

    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    cold = materialize(cfg)
    after_cold = draws()
    torch.set_rng_state(states[0]), np.random.set_state(states[1]), random.setstate(states[2])
    warm = materialize(cfg)
    assert isinstance(cold, Twin) and cold.root == warm.root and draws() == after_cold


def test_the_cddb_twin_hands_a_twin_pretrained_backbone_over_as_model_weights(compose_cfg, tmp_path: Path) -> None:
    ov = [
        "data=cddb_hard",
        f"data.twin.cache_dir={tmp_path}",
        "data.twin.n_train=6",
        "data.crop=32",
        "model=convit_tiny",
        "model.pretrained=false",
        "model.img_size=32",
        "+model.kwargs.patch_size=8",
        "+model.kwargs.embed_dim=24",
        "+model.kwargs.depth=2",
        "+model.kwargs.local_up_to_layer=1",
        "model.twin_pretrain.enabled=true",
        "model.twin_pretrain.steps=2",
        "model.twin_pretrain.n_images=32",
        "model.twin_pretrain.batch_size=8",
    ]
    cfg = compose_cfg(ov)
    protocol = build_protocol(cfg)
    weights = Path(cfg.model.weights)
    assert weights.is_file() and weights.parent == tmp_path / "twin_backbones"
    # the run's record of it: data/info.json["twin"] names the file and the recipe
    assert protocol.info["twin"]["backbone"]["weights"] == str(weights)
    assert protocol.info["twin"]["backbone"]["twin_pretrain"]["steps"] == 2
    # written once: the next run finds it; another recipe is another file
    written = weights.stat().st_mtime_ns
    again = compose_cfg(ov)
    build_protocol(again)
    assert again.model.weights == str(weights) and weights.stat().st_mtime_ns == written
    # the file is a function of the recipe, not of the random state of the run that built it first
    torch.manual_seed(1234)
    fresh = compose_cfg([*ov, f"data.twin.cache_dir={tmp_path / 'fresh'}", "seed=1"])
    build_protocol(fresh)
    assert Path(fresh.model.weights).name == weights.name
    assert Path(fresh.model.weights).read_bytes() == weights.read_bytes()
    for change in ("model.twin_pretrain.strength=1.0", "model.twin_pretrain.pretext=degradations"):
        other = compose_cfg([*ov, change])
        build_protocol(other)
        assert other.model.weights != str(weights) and Path(other.model.weights).is_file()
    cfg = compose_cfg([*ov, "model.twin_pretrain.enabled=false"])
    protocol = build_protocol(cfg)
    assert cfg.model.weights is None and "backbone" not in protocol.info["twin"]


def test_every_cache_outside_a_run_follows_the_config_default(monkeypatch, tmp_path):
    """conf/paths/default.yaml: cache_dir = ${oc.env:GENATTR_CACHE,<project>/.cache}; code paths without a config
    (a twin or backbone built from Python) use the same rule."""
    from genattr.utils.io import cache_dir

    monkeypatch.delenv("GENATTR_CACHE", raising=False)
    assert cache_dir(None) == Path(__file__).resolve().parents[2] / ".cache"
    monkeypatch.setenv("GENATTR_CACHE", str(tmp_path / "env"))
    assert cache_dir(None) == tmp_path / "env" and cache_dir(tmp_path / "given") == tmp_path / "given"
