"""One way to resolve a path.

Every relative path in params.yaml is relative to the project root, which is the
directory holding dvc.yaml (DVC runs each stage from there).
"""
from __future__ import annotations

import os
from pathlib import Path


class PathEscapeError(ValueError):
    """An id or relative path would resolve outside the folder it must stay in."""


def project_root() -> Path:
    """The project root: $PIPELINE_ROOT if set, else the current directory."""
    return Path(os.environ.get("PIPELINE_ROOT", os.getcwd())).resolve()


def project_path(path: str | os.PathLike) -> Path:
    """Resolve a params path: absolute stays, relative is taken from the project root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


def safe_join(base: str | os.PathLike, relative: str, what: str = "path") -> Path:
    """Join ``relative`` under ``base`` and refuse anything that escapes ``base``.

    Refused: absolute paths, ``..`` components that climb out, and symlinks whose
    target lies outside ``base``. The returned path need not exist.
    """
    if not relative or "\x00" in relative:
        raise PathEscapeError(f"{what} {relative!r} is empty or contains a NUL byte")
    rel = Path(relative)
    if rel.is_absolute() or relative.startswith(("/", "\\")) or (len(relative) > 1 and relative[1] == ":"):
        raise PathEscapeError(f"{what} {relative!r} is an absolute path; it must stay inside {base}")
    base_resolved = Path(base).resolve()
    candidate = base_resolved / rel
    resolved = candidate.resolve()  # follows links that exist
    if resolved != base_resolved and base_resolved not in resolved.parents:
        raise PathEscapeError(f"{what} {relative!r} resolves to {resolved}, outside {base_resolved}")
    return candidate
