"""Shared fixtures: single-threaded torch, offline hub, one cache for twins and twin backbones,
and Hydra compose helpers (``version_base="1.3"``, no cwd dependence)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
# the same float kernels on every x86 machine (MKL, oneDNN and ATen capped at AVX2), so a twin and every figure a
# test asserts come out the same on a developer's AVX-512 box and on the CI runner (set before torch loads; the
# Makefile exports the same values for `make demo` / `make bench`)
for _var, _value in (("MKL_CBWR", "AVX2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"), ("ATEN_CPU_CAPABILITY", "avx2")):
    os.environ.setdefault(_var, _value)
ROOT = Path(__file__).resolve().parents[1]
# twins and the twin-pretrained backbone are built once and shared by every test
os.environ.setdefault("GENATTR_CACHE", str(ROOT / ".cache" / "tests"))

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from genattr.config import register_resolvers  # noqa: E402

torch.set_num_threads(1)
register_resolvers()
CONF = str(ROOT / "conf")


def compose_config(overrides: Sequence[str], output_dir: Path) -> DictConfig:
    """Compose ``conf/config.yaml`` with overrides, writing run outputs to ``output_dir``."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """:func:`compose_config` with outputs in a fresh temp dir unless one is given."""

    def _compose(overrides: Sequence[str] = (), output_dir: Path | None = None) -> DictConfig:
        return compose_config(overrides, output_dir or tmp_path / "run")

    return _compose
