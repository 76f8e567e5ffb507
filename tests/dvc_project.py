"""Run the real DVC pipeline in a throwaway git copy of this repository.

What a copy holds: the work tree's files (tracked, and untracked ones git does not ignore),
so the tests see uncommitted code; but the two files that `dvc exp run` rewrites in the
work tree come from the committed tree:

- ``params.yaml``: every value is the one committed at HEAD. A `dvc exp run -S
  fusion.use_image=false` leaves ``use_image: false`` in the work tree, and a test copy
  that took it would measure the text-only model. Structure is taken from the work tree: a
  key (or section) added there and absent from HEAD is kept with its value, and one deleted
  there stays deleted, so an uncommitted new param and the code that reads it are tested
  together (`dvc exp run -S` changes values only; it cannot add a key). A changed value is
  not tested: a warning names it; commit a default to test it.
- ``dvc.lock``: HEAD's (the experiment's lock describes the experiment). Outputs are never
  copied (git ignores them), so the copy's first `dvc repro` runs every stage either way.

Tests that read the params directly (not through a copy) use :func:`params_for_tests`,
the same values.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
FROM_HEAD = ("dvc.lock",)  # rewritten by `dvc exp run`; params.yaml is merged (see above)


def _git(source: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=source, capture_output=True)


def _committed(source: Path, rel: str) -> bytes | None:
    """``rel`` as committed at HEAD, None if HEAD has no such file (or there is no git)."""
    p = _git(source, "show", f"HEAD:{rel}")
    return p.stdout if p.returncode == 0 else None


def _restore_values(work: Any, head: Any, path: str, restored: list[str]) -> Any:
    """The work tree's structure with HEAD's value at every leaf both have."""
    if isinstance(work, dict) and isinstance(head, dict):
        return {k: _restore_values(v, head[k], f"{path}.{k}" if path else str(k), restored) if k in head else v
                for k, v in work.items()}
    if isinstance(work, dict) or isinstance(head, dict):  # a section became a value or back: structure
        return work
    if work != head or type(work) is not type(head):
        restored.append(path)
    return head


def params_text(source: Path = REPO) -> tuple[str, list[str]]:
    """The params.yaml text a test copy gets, and the dotted keys whose work-tree value it reverts."""
    work_text = (source / "params.yaml").read_text(encoding="utf-8")
    head_bytes = _committed(source, "params.yaml")
    if head_bytes is None:
        return work_text, []
    head_text = head_bytes.decode("utf-8")
    work, head = yaml.safe_load(work_text) or {}, yaml.safe_load(head_text) or {}
    restored: list[str] = []
    merged = _restore_values(work, head, "", restored)
    if not restored:
        return work_text, []  # values as committed: the work tree's file as it is
    if merged == head:
        return head_text, restored  # only values changed (what `dvc exp run` leaves): HEAD's file, comments and all
    return yaml.safe_dump(merged, sort_keys=False, allow_unicode=True), restored


def params_for_tests(source: Path = REPO) -> dict:
    """The params every test uses: the work tree's keys with HEAD's values (see the module doc)."""
    return yaml.safe_load(params_text(source)[0]) or {}


def copy_project(dest: Path, source: Path = REPO) -> Path:
    """Copy ``source``'s tracked + untracked-not-ignored files into ``dest``, with params.yaml
    and dvc.lock from HEAD as the module doc says, and commit them in a new git repo."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=source, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, out):
        src = source / rel
        if not src.is_file():  # deleted in the work tree
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    for rel in FROM_HEAD:
        committed = _committed(source, rel)
        if committed is not None:
            (dest / rel).write_bytes(committed)
    if (source / "params.yaml").is_file():
        text, restored = params_text(source)
        if restored:
            warnings.warn(f"params.yaml: the test copy uses the committed values of {', '.join(restored)} "
                          f"(the work tree's differ, as `dvc exp run` leaves them; `git checkout params.yaml` "
                          f"drops them, and a new default is tested once committed)", stacklevel=2)
        (dest / "params.yaml").write_text(text, encoding="utf-8")
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
