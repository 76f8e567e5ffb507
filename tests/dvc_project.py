"""Run the real DVC pipeline in a throwaway git copy of this repository."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def copy_project(dest: Path) -> Path:
    """Copy the tracked + untracked-not-ignored files into ``dest`` and commit them in a new git repo."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, out):
        src = REPO / rel
        if not src.is_file():  # deleted in the work tree
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def dvc_env() -> dict:
    env = dict(os.environ)
    env.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t", PYTHONHASHSEED="0")
    env.pop("PIPELINE_ROOT", None)
    # stages run `python -m ...`: make sure it is this interpreter
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def dvc(project: Path, *args: str, timeout: int = 900) -> str:
    """Run ``dvc ARGS`` in ``project``; raise with the full output if it fails."""
    p = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=dvc_env(),
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p.stdout + p.stderr


def stages_run(output: str) -> set[str]:
    """Names of the stages that `dvc repro` / `dvc exp run` actually executed."""
    return set(re.findall(r"Running stage '([^']+)'", output))
