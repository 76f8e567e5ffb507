"""One way to load params: a stage sees exactly the params that dvc.yaml declares for it.

``load_params("train", item="demo_tweets")`` reads dvc.yaml, finds the ``params:`` list
of that stage (substituting ``${item}`` / ``${key}`` for ``foreach`` stages), and returns a
read-only view of params.yaml restricted to those keys. Reading anything else raises
:class:`UndeclaredParamError`, so a stage cannot depend on a param that DVC does not track.

Per-dataset values: ``datasets.<name>.overrides`` (a nested mapping such as
``{detector: {source: annotations}}``) replaces those keys for every stage instance of that
dataset. DVC tracks them through ``datasets.<name>``, which every per-dataset stage that may
read an overridden section declares; a key that does not exist in params.yaml, or a section
read by a per-dataset stage that does not declare ``datasets.<name>``, is refused.
"""
from __future__ import annotations

import copy
import json
import re
import sys
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


OVERRIDES = "overrides"


def _leaves(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in tree.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            yield from _leaves(v, path)
        else:
            yield path, v


def _untracked_sections(root: Path) -> set[str]:
    """Sections read by a per-dataset stage that does not declare ``datasets.${item}``."""
    stages = (read_yaml(root / "dvc.yaml") or {}).get("stages", {})
    out: set[str] = set()
    for spec in stages.values():
        if "foreach" not in spec:
            continue
        keys = [k for e in spec["do"].get("params", []) or [] for k in (e if isinstance(e, list) else [e])
                if isinstance(k, str)]
        if not any(k.startswith("datasets.${") for k in keys):
            out.update(k.split(".")[0] for k in keys)
    return out


def apply_dataset_overrides(data: Mapping, item: str, root: Path) -> dict:
    """``data`` with ``datasets.<item>.overrides`` merged in (a new tree; errors name the key)."""
    ds = (data.get("datasets") or {}).get(item)
    over = ds.get(OVERRIDES) if isinstance(ds, Mapping) else None
    if not over:
        return dict(data)
    if not isinstance(over, Mapping):
        raise ParamsError(f"params.yaml: datasets.{item}.{OVERRIDES} must be a mapping like "
                          f"{{detector: {{source: annotations}}}}, got {over!r}")
    out = copy.deepcopy(dict(data))
    untracked = _untracked_sections(root)
    for path, value in _leaves(over):
        parts = path.split(".")
        where = f"params.yaml: datasets.{item}.{OVERRIDES}.{path}"
        if parts[0] in ("datasets", "mner_datasets", "retrieval_datasets", "image_datasets", "region_datasets"):
            raise ParamsError(f"{where}: the dataset lists and entries are not per-dataset knobs")
        if parts[0] in untracked:
            raise ParamsError(f"{where}: section {parts[0]!r} cannot be set per dataset (a stage that reads it "
                              f"does not track datasets.{item})")
        node = out
        for p in parts[:-1]:
            node = node.get(p) if isinstance(node, Mapping) else None
            if not isinstance(node, dict):
                break
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ParamsError(f"{where}: there is no param {path!r} to override")
        if isinstance(node[parts[-1]], Mapping):
            raise ParamsError(f"{where}: {path!r} is a section; override its keys one by one")
        if value != node[parts[-1]]:
            out.setdefault("_overridden", {})[path] = (node[parts[-1]], value)
        node[parts[-1]] = value
    return out


_KIND_LISTS = {"mner_datasets": "mner", "retrieval_datasets": "retrieval"}


def check_dataset_for_stage(stage: str, item: str, data: Mapping, root: Path) -> None:
    """``item`` names a dataset of the kind ``stage`` runs on (from its dvc.yaml ``foreach`` list)."""
    datasets = data.get("datasets") or {}
    if item not in datasets:
        raise ParamsError(f"params.yaml: no dataset named {item!r} in `datasets` (have: {', '.join(datasets) or 'none'}); "
                          f"add it there (README: Using a real dataset)")
    spec = ((read_yaml(root / "dvc.yaml") or {}).get("stages") or {}).get(stage) or {}
    m = _VAR.fullmatch(str(spec.get("foreach", "")).strip())
    listed = m.group(1) if m else None
    if listed in (None, "datasets"):
        return
    entry = datasets[item] if isinstance(datasets[item], Mapping) else {}
    kind = entry.get("kind")
    if listed in _KIND_LISTS:
        if kind != _KIND_LISTS[listed]:
            article = {"mner": "an mner", "retrieval": "a retrieval"}
            raise ParamsError(f"{item} is {article.get(kind, repr(kind))} dataset; {stage} needs "
                              f"{article[_KIND_LISTS[listed]]} dataset "
                              f"(params.yaml {listed}: {', '.join(map(str, data.get(listed) or [])) or 'none'})")
    elif listed in ("image_datasets", "region_datasets"):
        from pipeline.data.conll import has_images
        if not has_images(str(entry.get("format", ""))):
            raise ParamsError(f"{item} has no images (format {entry.get('format')}); {stage} runs only on "
                              f"datasets with images (params.yaml {listed})")
        if item not in (data.get(listed) or []):
            raise ParamsError(f"{item} is not in params.yaml {listed} ({', '.join(map(str, data.get(listed) or []))}), "
                              f"the datasets {stage} runs on; add it there to run {stage} on it")
    elif item not in (data.get(listed) or []):
        raise ParamsError(f"{item} is not in params.yaml {listed}, the datasets {stage} runs on")


def validate_params(data: Mapping, declared: list[str], overridden: Mapping[str, Any] = {}, item: str | None = None) -> None:
    """Check the declared sections (and that every top-level key is a known section) against
    :mod:`pipeline.schema`; one :class:`ParamsError` lists every problem with its dotted name."""
    from pipeline.schema import SECTIONS, check_section
    problems = [f"{k}: unknown section (allowed: {', '.join(SECTIONS)})" for k in data if k not in SECTIONS]
    checked: set[str] = set()
    for d in declared:
        parts = d.split(".")
        name = ".".join(parts[:2]) if parts[0] == "datasets" and len(parts) > 1 else parts[0]
        if name in checked or name not in SECTIONS and not name.startswith("datasets."):
            continue
        checked.add(name)
        node: Any = data
        for p in name.split("."):
            node = node.get(p) if isinstance(node, Mapping) else None
        if node is None:
            problems.append(f"{name}: missing")
            continue
        for prob in check_section(name, node):
            key = prob.split(" ", 1)[0].rstrip(":")
            if key in overridden:  # say where the value came from
                prob += f" (set by datasets.{item}.{OVERRIDES})"
            problems.append(prob)
    if problems:
        n = len(problems)
        raise ParamsError(f"params.yaml: {n} problem{'s' if n > 1 else ''}: " + "; ".join(problems))


def load_params(stage: str, item: str | None = None, root: Path | None = None) -> Params:
    """Params for one stage (instance ``item`` of a foreach stage), gated by dvc.yaml, with the
    dataset's ``overrides`` applied when the stage declares ``datasets.<item>``, and checked
    against the schema (:mod:`pipeline.schema`) before any work."""
    root = root or project_root()
    declared = declared_params(stage, item, root)
    data = read_yaml(root / "params.yaml") or {}
    if not isinstance(data, Mapping):
        raise ParamsError(f"params.yaml: the top level must be a mapping of sections, got {type(data).__name__}")
    if item is not None:
        check_dataset_for_stage(stage, item, data, root)
    overridden: dict = {}
    if item is not None and f"datasets.{item}" in declared:
        data = apply_dataset_overrides(data, item, root)
        overridden = data.pop("_overridden", {})
        sections = {d.split(".")[0] for d in declared}
        for path, (was, now) in sorted(overridden.items()):
            if path.split(".")[0] in sections:  # say it: an override beats the global value and `-S`
                print(f"params: {path} = {now!r} for {item} (datasets.{item}.{OVERRIDES}; global value {was!r})",
                      file=sys.stderr)
    validate_params(data, declared, overridden, item)
    return Params(data, declared, stage)
