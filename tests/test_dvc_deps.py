"""dvc.yaml lists, for every stage, every project source file that stage runs.

DVC reruns a stage only when a declared dependency changes, so a module the stage imports
but does not declare (say pipeline/stores/shards.py for `train`) could change without the
stage rerunning, and its outputs would silently be stale. The import graph is read from the
source (every `import` / `from ... import`, at module level or inside functions, followed
transitively within the project), and each file must lie under one of the stage's deps.
Package `__init__.py` files that hold no code are left out. Data files that code reads at
run time (e.g. pipeline/encoders/model_configs/*.json) are not imports: list them by hand.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("pipeline", "stages")


def _module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imported_names(path: Path) -> set[str]:
    """Dotted names of every module a file imports (``from a import b`` gives a and a.b)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _has_code(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # a docstring alone is no code
    return bool(body)


def source_files(entry: Path) -> set[Path]:
    """Project files that ``entry`` runs: itself plus its transitive project imports."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_names(path):
            parts = name.split(".")
            if parts[0] not in PROJECT_PACKAGES:
                continue
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                f = _module_file(".".join(parts[:i]))
                if f is not None and f not in seen:
                    todo.append(f)
    return {f for f in seen if f.name != "__init__.py" or _has_code(f)}


def _stages() -> list[tuple[str, dict]]:
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return [(name, s.get("do", s)) for name, s in spec.items()]


def _code_deps(stage: dict) -> list[str]:
    return [d for d in stage.get("deps", []) if isinstance(d, str) and d.split("/")[0] in PROJECT_PACKAGES]


def test_the_import_scan_sees_imports_inside_functions_and_relative_ones(tmp_path, monkeypatch):
    # pipeline/mner/evaluate.py imports mner.train inside a function
    files = {f.relative_to(REPO).as_posix() for f in source_files(REPO / "pipeline" / "mner" / "evaluate.py")}
    assert {"pipeline/mner/train.py", "pipeline/mner/model.py", "pipeline/metrics/ner.py"} <= files
    assert "pipeline/retrieval/rerank.py" not in files
    # relative imports (none in the project today) resolve against the importing package
    pkg = tmp_path / "pipeline" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n    from ..c import g\n")
    (pkg / "b.py").write_text("")
    (tmp_path / "pipeline" / "c.py").write_text("def g(): pass\n")
    monkeypatch.setitem(globals(), "REPO", tmp_path)  # the scan resolves modules under REPO
    assert {f.relative_to(tmp_path).as_posix() for f in source_files(pkg / "a.py")} == {
        "pipeline/sub/a.py", "pipeline/sub/b.py", "pipeline/c.py"}


@pytest.mark.parametrize("name,stage", _stages(), ids=[n for n, _ in _stages()])
def test_every_source_file_a_stage_runs_is_a_declared_dependency(name, stage):
    cmd = stage["cmd"].split()
    assert cmd[:2] == ["python", "-m"] and cmd[2].startswith("stages."), \
        f"dvc.yaml: stage {name}: expected `python -m stages.<module> ...`, got {stage['cmd']!r}"
    entry = _module_file(cmd[2])
    assert entry is not None, f"dvc.yaml: stage {name}: no module {cmd[2]}"
    deps = _code_deps(stage)
    undeclared = sorted(
        rel for rel in (f.relative_to(REPO).as_posix() for f in source_files(entry))
        if not any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)
    )
    assert not undeclared, f"dvc.yaml: stage {name!r} runs these files but does not list them in deps: {undeclared}"
    missing = [d for d in deps if not (REPO / d).exists()]
    assert not missing, f"dvc.yaml: stage {name!r} lists deps that do not exist: {missing}"
