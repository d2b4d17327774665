"""Git provenance of a run (commit and dirty flag), recorded as MLflow tags."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_info(root: str | Path) -> dict[str, str]:
    def _git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    sha = _git("rev-parse", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if sha != "unknown" else False
    return {"git_sha": sha, "git_dirty": str(dirty).lower()}
