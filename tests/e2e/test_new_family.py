"""The README's "adding a method" promise: a new family is one module and one YAML, and nothing else.

The module and the YAML are taken verbatim from the README (between their ``new-family`` markers), put where the
README says (the module into the ``genattr.methods`` package path, the YAML into a config folder on Hydra's search
path), and run end to end on the CDDB twin: every stage checkpointed, metrics at each stage's index, and a run
stopped after a stage resumes to the same results.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import compose_config

import genattr.methods
from genattr.run import run

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks() -> dict[str, tuple[str, str]]:
    """``kind -> (path, text)`` of the README's ``<!-- new-family:<kind> <path> -->`` code blocks."""
    text = README.read_text()
    found = re.findall(r"<!-- new-family:(\w+) (\S+) -->\n```\w+\n(.*?)```", text, flags=re.S)
    return {kind: (path, body) for kind, path, body in found}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    blocks = _blocks()
    assert set(blocks) == {"module", "yaml"}, "the README must show exactly one module and one YAML"
    root = tmp_path_factory.mktemp("newfamily")
    module_path, module = blocks["module"]
    yaml_path, yaml = blocks["yaml"]
    assert module_path.startswith("genattr/methods/") and yaml_path.startswith("conf/method/")
    (root / "methods").mkdir()
    (root / "methods" / Path(module_path).name).write_text(module)
    (root / "conf" / "method").mkdir(parents=True)
    (root / "conf" / "method" / Path(yaml_path).name).write_text(yaml)
    genattr.methods.__path__.append(str(root / "methods"))  # as if the file were in genattr/methods/
    yield [
        f"hydra.searchpath=[file://{root / 'conf'}]",
        f"method={Path(yaml_path).stem}",
        "data=cddb_hard",
        "data.twin.n_train=6",
        "data.twin.n_val=6",
        "tracking=none",
    ]
    genattr.methods.__path__.remove(str(root / "methods"))


@pytest.mark.slow
def test_a_new_family_from_the_readme_runs_checkpoints_and_resumes(family: list[str], tmp_path: Path) -> None:
    full = run(compose_config(family, tmp_path / "full"), overrides=family)
    assert full.completed and [len(r) for r in full.results["accuracy"]] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())[-1] == "task_004"
    stopped = [*family, "stop_after_task=1"]
    first = run(compose_config(stopped, tmp_path / "resumed"), overrides=stopped)
    assert not first.completed and len(first.results["accuracy"]) == 2
    second = run(compose_config(family, tmp_path / "resumed"), overrides=family)
    assert second.completed
    assert json.loads((tmp_path / "resumed" / "results.json").read_text()) == json.loads(
        (tmp_path / "full" / "results.json").read_text()
    )
