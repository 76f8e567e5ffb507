"""The seed's ablations as params overrides, and a table of their metrics over seeds.

Each ablation is a set of ``section.key=value`` overrides, run as a DVC experiment::

    dvc exp run -n no_region-seed1 -S fusion.use_regions=false -S train.seed=1

Runs are read back from ``dvc exp show --json`` (or from plain params + metrics files) and
grouped per dataset by the params that shape that dataset's MNER scores: the keys dvc.yaml
declares for the stages upstream of ``evaluate@<dataset>`` (demo, prepare, patches, regions,
text, train, evaluate), less the seed and the speed knobs (threads, devices, workers,
extraction batch sizes). Experiments that differ only elsewhere (``rerank.*``,
``retrieval.*``, another dataset) trained the same model: within a group, runs with the same
``train.seed`` count once (a note under the table names them), so ``n`` is the number of
distinct seeds and a spread is printed only from two seeds on. Each group is named by the
ablation whose overrides hold (:func:`classify`), plus the keys in which it differs from the
other groups of that name. Cells are mean ± sample standard deviation over seeds.
"""
from __future__ import annotations

import copy
import json
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
# the stages whose params shape one MNER dataset's scores (everything upstream of evaluate@<ds>)
MNER_STAGES = ("demo", "prepare", "patches", "regions", "text", "train", "evaluate")
# keys of those stages that change the speed, not the numbers: runs differing only there are
# the same setting (the feature caches' fingerprints leave the same knobs out)
SPEED_KEYS = re.compile(r"(?:^|\.)(?:threads|device|workers)$"
                        r"|^(?:clip|text|evaluate)\.batch_size$|^detector\.crop_batch_size$|^shards\.size$")


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
    config: tuple[tuple[str, str], ...] = ()  # the params that shape these scores, seed aside (:func:`mner_config`)
    baseline: str = ""  # the commit the experiment is based on


def _canon(v: Any) -> str:
    """A comparable text of a param value (2 and 2.0 are the same; true is not 1)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(int(v)) if float(v).is_integer() else repr(float(v))
    return json.dumps(v, sort_keys=True, default=str)


def shaping_keys(dataset: str, flat_params: Mapping[str, Any], root: str | Path | None = None) -> list[str] | None:
    """The params keys (dotted prefixes) that shape ``dataset``'s MNER scores: what dvc.yaml
    declares for the stages in :data:`MNER_STAGES`, skipping a foreach stage whose list (in
    these params) does not hold the dataset (a set without images has no patches or regions).
    None when there is no dvc.yaml: then every key counts."""
    from pipeline.params import declared_params, read_yaml
    from pipeline.paths import project_root

    root = Path(root) if root is not None else project_root()
    if not (root / "dvc.yaml").is_file():
        return None
    stages = (read_yaml(root / "dvc.yaml") or {}).get("stages") or {}
    keys: set[str] = set()
    for stage in MNER_STAGES:
        spec = stages.get(stage)
        if not isinstance(spec, Mapping):
            continue
        foreach = str(spec.get("foreach", "")).strip()
        m = re.fullmatch(r"\$\{\s*([\w.]+)\s*\}", foreach)
        listed = flat_params.get(m.group(1)) if m and m.group(1) != "datasets" else None
        if isinstance(listed, list) and dataset not in listed:
            continue
        keys.update(declared_params(stage, dataset if foreach else None, root))
    return sorted(keys)


def mner_config(flat_params: Mapping[str, Any], keys: Sequence[str] | None) -> tuple[tuple[str, str], ...]:
    """``(key, value)`` pairs of the params under ``keys`` (all when None), less the seed and
    the speed knobs (:data:`SPEED_KEYS`): two runs with equal configs and seeds are one run."""
    out = []
    for k, v in flat_params.items():
        if k == SEED_KEY or SPEED_KEYS.search(k):
            continue
        if keys is None or any(k == p or k.startswith(p + ".") for p in keys):
            out.append((k, _canon(v)))
    return tuple(sorted(out))


def run_from(name: str, flat_params: Mapping[str, Any], metrics_by_file: Mapping[str, Mapping],
             root: str | Path | None = None, baseline: str = "") -> list[Run]:
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
        ds = hit.group("dataset")
        config = mner_config(flat_params, shaping_keys(ds, flat_params, root))
        out.append(Run(name, ds, classify(flat_params), flat_params.get(SEED_KEY), scores, config, baseline))
    return out


def runs_from_exp_show(data: Sequence[Mapping[str, Any]], include_workspace: bool = False,
                       root: str | Path | None = None) -> list[Run]:
    """Runs from ``dvc exp show --json`` output (experiments; optionally the workspace too)."""
    runs: list[Run] = []
    commits = [str(s.get("rev")) for s in data if s.get("rev") != "workspace"]
    head = commits[0] if commits else ""  # the workspace is based on the first commit listed

    def visit(state: Mapping[str, Any], is_exp: bool, baseline: str) -> None:
        d = state.get("data") or {}
        if d and (is_exp or (include_workspace and state.get("rev") == "workspace")):
            params = flatten(((d.get("params") or {}).get("params.yaml") or {}).get("data") or {})
            metrics = {p: (r or {}).get("data") for p, r in (d.get("metrics") or {}).items()}
            rev = str(state.get("rev", ""))
            name = state.get("name") or (rev if rev == "workspace" else rev[:7])
            runs.extend(run_from(name, params, metrics, root, baseline))
        for rng in state.get("experiments") or []:
            for rev in rng.get("revs") or []:
                visit(rev, True, baseline)

    for state in data:
        visit(state, False, head if state.get("rev") == "workspace" else str(state.get("rev", "")))
    return runs


def _fmt(values: Sequence[float], scale: float) -> str:
    """Mean over seeds; the spread (sample sd) only from two seeds on."""
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{scale * mean:.2f} (n=1)"
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{scale * mean:.2f} ± {scale * sd:.2f} (n={len(values)})"


def _labels(configs: Mapping[tuple, str]) -> dict[tuple, str]:
    """A row name per config: its ablation, plus the keys in which it differs from the other
    configs of that ablation (``full (fusion.hidden=64)``)."""
    by_name: dict[str, list[tuple]] = defaultdict(list)
    for cfg, name in configs.items():
        by_name[name].append(cfg)
    out: dict[tuple, str] = {}
    for name, cfgs in by_name.items():
        if len(cfgs) == 1:
            out[cfgs[0]] = name
            continue
        dicts = [dict(c) for c in cfgs]
        varying = sorted(k for k in set().union(*dicts) if len({d.get(k) for d in dicts}) > 1)
        for cfg, d in zip(cfgs, dicts):
            shown = ", ".join(f"{k}={json.loads(d[k]) if k in d else '–'}" for k in varying)
            out[cfg] = f"{name} ({shown})"
    return out


def _column(metric: str) -> str:
    return metric.replace("_", " ").replace("f1", "F1")


def markdown_table(runs: Iterable[Run], metrics: Sequence[str] = ("test_f1", "valid_f1"), scale: float = 100.0) -> str:
    """Rows: settings (the seed's ablations in order first); columns: dataset × metric, mean ±
    sd over distinct seeds. Runs with the same config and seed count once; notes under the
    table say which."""
    runs = list(runs)
    several_commits = len({r.baseline for r in runs}) > 1

    def key(r: Run) -> tuple:
        return r.config + ((("@commit", json.dumps(r.baseline[:7])),) if several_commits else ())

    # (dataset, config) -> seed -> runs
    groups: dict[tuple[str, tuple], dict[Any, list[Run]]] = defaultdict(lambda: defaultdict(list))
    names: dict[str, dict[tuple, str]] = defaultdict(dict)
    for r in runs:
        groups[(r.dataset, key(r))][_canon(r.seed)].append(r)
        names[r.dataset][key(r)] = r.ablation
    labels = {ds: _labels(cfgs) for ds, cfgs in names.items()}

    cells: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    notes: list[str] = []
    for (ds, cfg), by_seed in groups.items():
        label = labels[ds][cfg]
        for seed_runs in by_seed.values():
            for m in metrics:
                vals = [r.scores[m] for r in seed_runs if m in r.scores]
                if vals:
                    cells[(label, ds)][m].append(sum(vals) / len(vals))
            if len(seed_runs) > 1:
                shown = metrics[0]
                vals = [f"{scale * r.scores[shown]:.2f}" for r in seed_runs if shown in r.scores]
                same = len(set(vals)) <= 1
                differ = "" if same else f" (their {_column(shown)}: {', '.join(vals)}; the mean is used)"
                notes.append(f"- {label}, {ds}, seed {seed_runs[0].seed}: {len(seed_runs)} runs with the same params "
                             f"({', '.join(r.name for r in seed_runs)}) counted once{differ}")
    datasets = sorted({r.dataset for r in runs})
    seen = {lab for d in labels.values() for lab in d.values()}
    order = {a: i for i, a in enumerate(ABLATIONS)}
    rows = sorted(seen, key=lambda lab: (order.get(lab.split(" (")[0], len(order)), lab))
    header = ["setting"] + [f"{d} {_column(m)}" for d in datasets for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for a in rows:
        row = [a] + [_fmt(cells[(a, d)][m], scale) for d in datasets for m in metrics]
        lines.append("| " + " | ".join(row) + " |")
    out = "\n".join(lines) + "\n"
    if notes:
        out += ("\nn counts distinct `train.seed` values; runs that differ only in params that do not shape "
                "the MNER scores count once:\n" + "\n".join(sorted(notes)) + "\n")
    return out
