"""The README's "Divergences from the originals" table stays true: every flag it names is a config key.

A row names its flag as ``method.x``, ``model.x``, ``data.x`` or ``trainer.x`` (``{a, b}`` lists several keys,
``=value`` a setting). Each must exist in a config composed for that table's family, so a renamed or removed
flag fails here instead of leaving the table pointing at nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Divergences from the originals"

#: the configs each table's flags are looked up in (the table heading's first word -> overrides)
FAMILIES: dict[str, list[list[str]]] = {
    "LoRAX": [[f"method={m}", "data=cddb_hard"] for m in ("lorax", "der", "replay")],
    "AI-GenBench": [
        ["method=detector", "data=aigenbench", f"model={m}"]
        for m in ("dinov2_vitl14_tune", "clip_vitl14_tune", "rn50_clip_tune", "detector")
    ],
    "GS-LoRA": [
        [f"method={m}", f"data={d}"] + (["model=vit_b16_imagenet100"] if d == "imagenet100" else [])
        for m in ("gslora", "gslora_pp", "lora", "retrain", "l2", "ewc", "mas", "lwf", "derpp", "scrub", "pretrain")
        for d in ("casia100", "imagenet100")
    ],
    "Attribution": [["method=unlearn", "data=mscoco"]],
    "Model": [["method=prada", "data=rarvar"]],
}
FLAG = re.compile(r"`((?:method|model|data|trainer)\.[^`]*)`")


def _tables() -> dict[str, list[list[str]]]:
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, "the README lost its divergences section"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    tables: dict[str, list[list[str]]] = {}
    current = None
    for line in body.splitlines():
        if line.startswith("### "):
            current = line[4:].split()[0]
            tables[current] = []
        elif current and line.startswith("| ") and not line.startswith("| part |"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            tables[current].append(cells)
    return tables


def _keys(flag_cell: str) -> list[str]:
    """Config keys named in a flag cell: ``a.{b, c}`` -> a.b, a.c; ``a.b=x`` -> a.b; placeholders skipped."""
    keys = []
    for span in FLAG.findall(flag_cell):
        span = re.split(r"[= ]", span.replace("\\|", "|"), maxsplit=1)[0] if "{" not in span else span
        m = re.fullmatch(r"([\w.]+)\.\{([^}]*)\}", span.split("=")[0].strip())
        names = [f"{m.group(1)}.{k.strip()}" for k in m.group(2).split(",")] if m else [span.split("=")[0]]
        keys += [k.rstrip(".") for k in names if "<" not in k and "*" not in k]
    return keys


def test_every_family_has_a_table_with_rows() -> None:
    tables = _tables()
    assert set(tables) == set(FAMILIES), sorted(tables)
    assert all(len(rows) >= 3 and all(len(r) == 5 for r in rows) for rows in tables.values())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_flag_in_the_table_is_a_config_key(family: str, compose_cfg) -> None:
    cfgs = [compose_cfg(ov) for ov in FAMILIES[family]]
    missing = set()
    found = 0
    for row in _tables()[family]:
        for key in _keys(row[3]):
            found += 1
            if all(OmegaConf.select(c, key, default="<absent>") == "<absent>" for c in cfgs):
                missing.add(key)
    assert found > 0
    assert not missing, f"README divergences table ({family}) names keys no config has: {sorted(missing)}"


def test_the_key_parser_reads_lists_settings_and_skips_placeholders() -> None:
    cell = "`method.stage1.alg3.{iters, lr}`, `model.pos_embed_resample=hub\\|timm`, `method.schedule.<key>`"
    assert _keys(cell) == ["method.stage1.alg3.iters", "method.stage1.alg3.lr", "model.pos_embed_resample"]
