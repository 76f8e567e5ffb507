"""One way to load params: a stage sees exactly the params that dvc.yaml declares for it.

``load_params("train", item="demo_tweets")`` reads dvc.yaml, finds the ``params:`` list
of that stage (substituting ``${item}`` / ``${key}`` for ``foreach`` stages), and returns a
read-only view of params.yaml restricted to those keys. Reading anything else raises
:class:`UndeclaredParamError`, so a stage cannot depend on a param that DVC does not track.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.paths import project_root


class ParamsError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class UndeclaredParamError(ParamsError):
    """A stage read a param that dvc.yaml does not list for it."""


class MissingParamError(ParamsError):
    """A declared param is absent from params.yaml."""


_VAR = re.compile(r"\$\{\s*([^}]+?)\s*\}")


def read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (run from the project root, where dvc.yaml is)") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from None


def declared_params(stage: str, item: str | None = None, root: Path | None = None) -> list[str]:
    """The dotted params.yaml keys that dvc.yaml declares for ``stage`` (instance ``item``)."""
    root = root or project_root()
    dvc = read_yaml(root / "dvc.yaml") or {}
    stages = dvc.get("stages", {})
    if stage not in stages:
        raise ParamsError(f"dvc.yaml: no stage named {stage!r} (have: {', '.join(stages)})")
    spec = stages[stage]
    if "foreach" in spec or "matrix" in spec:
        if item is None:
            raise ParamsError(f"dvc.yaml: stage {stage!r} is a foreach stage; pass the instance name")
        spec = spec["do"]
    keys: list[str] = []
    for entry in spec.get("params", []) or []:
        if isinstance(entry, dict):  # {other_file.yaml: [keys]} is not supported here
            for fname, sub in entry.items():
                if fname != "params.yaml":
                    raise ParamsError(f"dvc.yaml: stage {stage!r} reads params from {fname}; only params.yaml is supported")
                keys.extend(sub or [])
        else:
            keys.append(entry)

    def subst(m: re.Match) -> str:
        if m.group(1) in ("item", "key") and item is not None:
            return item
        raise ParamsError(f"dvc.yaml: stage {stage!r}: cannot resolve ${{{m.group(1)}}} in its params list")

    return [_VAR.sub(subst, k) for k in keys]


class Params(Mapping):
    """Read-only view over a params tree, limited to declared dotted keys."""

    def __init__(self, data: Any, declared: list[str], stage: str, prefix: str = "") -> None:
        self._data = data
        self._declared = declared
        self._stage = stage
        self._prefix = prefix

    def _path(self, key: str) -> str:
        return f"{self._prefix}.{key}" if self._prefix else key

    def _access(self, path: str) -> str:
        """'full' if path lies in a declared subtree, 'partial' if one is below it, else ''."""
        for d in self._declared:
            if path == d or path.startswith(d + "."):
                return "full"
        if any(d.startswith(path + ".") for d in self._declared):
            return "partial"
        return ""

    def __getitem__(self, key: str) -> Any:
        path = self._path(str(key))
        access = self._access(path)
        if not access:
            raise UndeclaredParamError(
                f"stage {self._stage!r} read param {path!r}, which dvc.yaml does not declare for it "
                f"(declared: {', '.join(self._declared) or 'none'}); add it to the stage's params list"
            )
        if not isinstance(self._data, Mapping) or key not in self._data:
            raise MissingParamError(f"params.yaml: missing param {path!r} (read by stage {self._stage!r})")
        value = self._data[key]
        if isinstance(value, Mapping):
            return Params(value, self._declared, self._stage, path)
        return value

    def __contains__(self, key: object) -> bool:
        """``key in params``: False if absent from params.yaml, an error if undeclared."""
        try:
            self[key]  # type: ignore[index]
        except MissingParamError:
            return False
        return True

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except MissingParamError:
            return default

    def __iter__(self) -> Iterator[str]:
        if not isinstance(self._data, Mapping):
            return iter(())
        return iter([k for k in self._data if self._access(self._path(str(k)))])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def to_dict(self) -> dict:
        """Plain dict of everything this view may read (for provenance and fingerprints)."""
        return {k: (v.to_dict() if isinstance(v, Params) else v) for k, v in ((k, self[k]) for k in self)}

    def __repr__(self) -> str:
        return f"Params({self._prefix or '<root>'}: {json.dumps(self.to_dict(), default=str)[:200]})"


def load_params(stage: str, item: str | None = None, root: Path | None = None) -> Params:
    """Params for one stage (instance ``item`` of a foreach stage), gated by dvc.yaml."""
    root = root or project_root()
    declared = declared_params(stage, item, root)
    data = read_yaml(root / "params.yaml") or {}
    return Params(data, declared, stage)
