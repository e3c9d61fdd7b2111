"""Where a number came from: the git commit of the code that produced it, and whether it was dirty."""
from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path


@cache
def git_state(folder: Path) -> tuple[str, bool]:
    """(full commit hash or 'unknown', whether tracked files differ from it) of the repository
    containing `folder`; 'unknown' outside a repository or without git."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = commit != "unknown" and bool(git("status", "--porcelain", "--untracked-files=no"))
    return commit, dirty
