"""``python -m genattr.rerun <run dir> [extra overrides]`` (``make rerun RUN=<dir>``).

Replays the overrides a run recorded in ``<dir>/.hydra/overrides.yaml`` into the *same* run dir with
``resume=auto``: a crashed, killed or cut-short run continues from its last checkpoint in its own
MLflow run. The config is re-composed from the recorded overrides rather than copied from
``.hydra/config.yaml`` because that file lacks the ``hydra`` node (output paths would revert). The
code must be the code that made the run: a different git commit than the recorded one is refused
unless ``--allow-other-commit`` (then recorded in the log); the recorded commit is printed so
``git checkout <sha>`` is one copy-paste away.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from genattr.config import PROJECT_ROOT
from genattr.tracking.sweep import RUN_INFO_FILE
from genattr.utils.git import git_info

#: Overrides that would point the replay somewhere else or start it fresh.
_DROPPED = ("resume=", "hydra.run.dir=", "hydra.sweep.dir=", "hydra.sweep.subdir=")


def replay_command(run_dir: Path, extra: list[str]) -> list[str]:
    """The ``launch.py`` command line that continues ``run_dir``."""
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        raise SystemExit(f"error: {overrides_file} does not exist; RUN= must be a genattr run or sweep-job dir")
    recorded = yaml.safe_load(overrides_file.read_text()) or []
    kept = [o for o in recorded if not o.lstrip("+~").startswith(_DROPPED)]
    return [sys.executable, str(PROJECT_ROOT / "launch.py"), *kept, *extra, f"hydra.run.dir={run_dir}", "resume=auto"]


def check_commit(run_dir: Path, allow_other: bool) -> None:
    info_file = run_dir / RUN_INFO_FILE
    if not info_file.is_file():
        print(f"warning: {info_file} is missing; cannot check that the code is the run's commit", file=sys.stderr)
        return
    recorded = json.loads(info_file.read_text()).get("git_sha", "unknown")
    now = git_info(PROJECT_ROOT)
    if recorded not in ("unknown", now["git_sha"]):
        message = f"the run was made at commit {recorded}, the checkout is at {now['git_sha']}"
        if not allow_other:
            raise SystemExit(f"error: {message}; `git checkout {recorded}` first, or pass --allow-other-commit")
        print(f"warning: {message}; replaying anyway (--allow-other-commit)", file=sys.stderr)
    if now["git_dirty"] == "true":
        print("warning: the checkout has uncommitted changes; they are part of the replay", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genattr.rerun", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run dir (logs/.../runs/...) or a sweep job dir (multirun/.../N)")
    parser.add_argument("overrides", nargs="*", help="extra overrides appended after the recorded ones")
    parser.add_argument("--allow-other-commit", action="store_true", help="replay with a different git commit")
    args = parser.parse_args(argv)
    run_dir = args.run_dir.expanduser().resolve()
    check_commit(run_dir, args.allow_other_commit)
    cmd = replay_command(run_dir, args.overrides)
    print("replaying:", " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd, env=os.environ.copy())


if __name__ == "__main__":
    sys.exit(main())
