"""The seed's ablations as params overrides, and a table of their metrics over seeds.

Each ablation is a set of ``section.key=value`` overrides, run as a DVC experiment::

    dvc exp run -n no_region-seed1 -S fusion.use_regions=false -S train.seed=1

Runs are read back from ``dvc exp show --json`` (or from plain params + metrics files),
classified by their params (which ablation's overrides hold), grouped per ablation and
dataset, and written as a markdown table with mean ± spread (sample standard deviation)
over seeds.
"""
from __future__ import annotations

import copy
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ABLATIONS: dict[str, dict[str, Any]] = {
    "full": {},
    "no_align": {"align.weight": 0.0},
    "no_adapt": {"fusion.adaptive": "none"},
    "no_region": {"fusion.use_regions": False},
    "no_patch": {"fusion.use_patches": False},
    "text_only": {"fusion.use_image": False},
    "qfnet1": {"fusion.layers": 1},
}
SEED_KEY = "train.seed"
METRICS_RE = re.compile(r"(?:^|/)metrics/(?P<dataset>[^/]+)/mner\.json$")


def overrides(name: str) -> dict[str, Any]:
    """The params overrides of one ablation."""
    if name not in ABLATIONS:
        raise KeyError(f"unknown ablation {name!r} (have: {', '.join(ABLATIONS)})")
    return dict(ABLATIONS[name])


def _yaml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def ablation_keys() -> list[str]:
    """Every params key some ablation changes (sorted)."""
    return sorted({k for ov in ABLATIONS.values() for k in ov})


def set_args(name: str, seed: int | None = None, baseline: Mapping[str, Any] | None = None) -> list[str]:
    """``-S key=value`` arguments for ``dvc exp run``.

    With ``baseline`` (flattened params of the experiments' base commit), every key that any
    ablation touches is set explicitly: ``dvc exp run`` applies its result to the workspace,
    so without this, the overrides of one run would leak into the next.
    """
    ov = overrides(name)
    if baseline is not None:
        for k in ablation_keys():
            if k not in ov:
                if k not in baseline:
                    raise KeyError(f"params.yaml: missing {k!r} (an ablation sets it)")
                ov[k] = baseline[k]
    if seed is not None:
        ov[SEED_KEY] = seed
    args: list[str] = []
    for k, v in ov.items():
        args += ["-S", f"{k}={_yaml_value(v)}"]
    return args


def exp_name(name: str, seed: int) -> str:
    return f"{name}-seed{seed}"


def exp_run_command(name: str, seed: int, queue: bool = False, baseline: Mapping[str, Any] | None = None) -> list[str]:
    """The ``dvc exp run`` command line of one ablation at one seed."""
    return ["dvc", "exp", "run", *(["--queue"] if queue else []), "-n", exp_name(name, seed),
            *set_args(name, seed, baseline)]


def committed_params(root: str | Path = ".") -> dict[str, Any]:
    """Flattened params.yaml of the git HEAD commit (the experiments' baseline).

    Falls back to the workspace file when git has none (a warning names which one is used).
    """
    import subprocess
    import warnings

    import yaml

    p = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=root, capture_output=True, text=True)
    if p.returncode == 0:
        return flatten(yaml.safe_load(p.stdout) or {})
    warnings.warn(f"git has no committed params.yaml ({p.stderr.strip()}); using the workspace file as baseline")
    return flatten(yaml.safe_load((Path(root) / "params.yaml").read_text(encoding="utf-8")) or {})


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def apply_overrides(params: Mapping[str, Any], ov: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of a params tree with dotted overrides applied (keys must exist)."""
    out = copy.deepcopy(dict(params))
    for dotted, v in ov.items():
        node = out
        *path, last = dotted.split(".")
        for p in path:
            if not isinstance(node, dict) or p not in node:
                raise KeyError(f"params: no section {dotted!r} to override")
            node = node[p]
        if last not in node:
            raise KeyError(f"params: no key {dotted!r} to override")
        node[last] = v
    return out


def classify(flat_params: Mapping[str, Any]) -> str:
    """Which ablation a run is, from its (flattened) params: ``full``, one name, or ``a+b``."""
    hits = [n for n, ov in ABLATIONS.items() if ov and all(_same(flat_params.get(k), v) for k, v in ov.items())]
    return "+".join(hits) if hits else "full"


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, bool) or isinstance(a, bool):
        return a is not None and bool(a) == bool(b) and type(a) is type(b)
    if isinstance(b, (int, float)) and isinstance(a, (int, float)):
        return math.isclose(float(a), float(b))
    return a == b


@dataclass
class Run:
    """One experiment's scores for one dataset."""

    name: str
    dataset: str
    ablation: str
    seed: Any
    scores: dict[str, float] = field(default_factory=dict)  # e.g. test_f1, valid_f1


def run_from(name: str, flat_params: Mapping[str, Any], metrics_by_file: Mapping[str, Mapping]) -> list[Run]:
    """Runs (one per dataset) of one experiment from its params and metrics files."""
    out = []
    for path, m in sorted(metrics_by_file.items()):
        hit = METRICS_RE.search(path.replace("\\", "/"))
        if not hit or not isinstance(m, Mapping):
            continue
        scores = {}
        for split in ("valid", "test"):
            if isinstance(m.get(split), Mapping):
                for k in ("precision", "recall", "f1"):
                    if isinstance(m[split].get(k), (int, float)):
                        scores[f"{split}_{k}"] = float(m[split][k])
        out.append(Run(name, hit.group("dataset"), classify(flat_params), flat_params.get(SEED_KEY), scores))
    return out


def runs_from_exp_show(data: Sequence[Mapping[str, Any]], include_workspace: bool = False) -> list[Run]:
    """Runs from ``dvc exp show --json`` output (experiments; optionally the workspace too)."""
    runs: list[Run] = []

    def visit(state: Mapping[str, Any], is_exp: bool) -> None:
        d = state.get("data") or {}
        if d and (is_exp or (include_workspace and state.get("rev") == "workspace")):
            params = flatten(((d.get("params") or {}).get("params.yaml") or {}).get("data") or {})
            metrics = {p: (r or {}).get("data") for p, r in (d.get("metrics") or {}).items()}
            name = state.get("name") or str(state.get("rev", ""))[:7]
            runs.extend(run_from(name, params, metrics))
        for rng in state.get("experiments") or []:
            for rev in rng.get("revs") or []:
                visit(rev, True)

    for state in data:
        visit(state, False)
    return runs


def _fmt(values: Sequence[float], scale: float) -> str:
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{scale * mean:.2f} (n=1)"
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{scale * mean:.2f} ± {scale * sd:.2f} (n={len(values)})"


def markdown_table(runs: Iterable[Run], metrics: Sequence[str] = ("test_f1", "valid_f1"), scale: float = 100.0) -> str:
    """Rows: ablations (the seed's order first); columns: dataset × metric, mean ± sd over runs."""
    runs = list(runs)
    groups: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        for m in metrics:
            if m in r.scores:
                groups[(r.ablation, r.dataset)][m].append(r.scores[m])
    datasets = sorted({r.dataset for r in runs})
    seen = {r.ablation for r in runs}
    rows = [a for a in ABLATIONS if a in seen] + sorted(seen - set(ABLATIONS))
    header = ["setting"] + [f"{d} {m.replace('_', ' ').replace('f1', 'F1')}" for d in datasets for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for a in rows:
        cells = [a] + [_fmt(groups[(a, d)][m], scale) for d in datasets for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
