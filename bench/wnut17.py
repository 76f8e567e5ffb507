"""WNUT-17 ablation: real text, the pipeline's own stages, mean ± sd over seeds.

    python -m bench.wnut17 --out reports/wnut17_ablation.md [--seeds 1 2 3] [--jobs 2] [--rows ...]
    python -m bench.wnut17 --speed [--steps 20 --rounds 3]   # step times, rows interleaved

Each row is a set of param overrides on top of the committed params.yaml. Every text
configuration gets its own scratch project (prepare + text stage, run once); every
(row, seed) run gets its own project that links those caches and runs the real `train` and
`evaluate` stages with one torch thread, ``--jobs`` runs side by side. Selection is on dev
(`valid`), test is reported; seconds per epoch come from each run's train report. The
scratch projects live under ``--work`` (default /tmp/wnut17-bench); a rerun reuses a run
whose params.yaml is unchanged and redoes one whose params changed (code changes are not
detected: use a fresh ``--work`` after changing the model).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATASET = "wnut17"
BASE = {"fusion.dropout": 0.3, "text.threads": 1}
ROWS: dict[str, dict] = {
    "frozen last layer": {"text.layers": [-1], "text.tune_top": 0, "fusion.char_dim": 0, "fusion.shape_dim": 0},
    "frozen last-four mix": {"text.layers": [-4, -3, -2, -1], "text.tune_top": 0,
                             "fusion.char_dim": 0, "fusion.shape_dim": 0},
    "+ characters and casing": {"text.layers": [-4, -3, -2, -1], "text.tune_top": 0,
                                "fusion.char_dim": 50, "fusion.shape_dim": 16},
    "+ tune_top 1": {"text.layers": [-4, -3, -2, -1], "text.tune_top": 1, "fusion.char_dim": 50, "fusion.shape_dim": 16},
    "+ tune_top 2": {"text.layers": [-4, -3, -2, -1], "text.tune_top": 2, "fusion.char_dim": 50, "fusion.shape_dim": 16},
    "full fine-tuning (tune_top 6)": {"text.layers": [-4, -3, -2, -1], "text.tune_top": 6,
                                      "fusion.char_dim": 50, "fusion.shape_dim": 16},
}
TABLE_ROWS = list(ROWS)
# learning-rate choices for the tuned layers, picked on dev (python -m bench.wnut17 --rows ...)
for _n in (1, 2):
    for _lr in (3e-4, 1e-3):
        ROWS[f"+ tune_top {_n}, lr_encoder {_lr:g}"] = {**ROWS[f"+ tune_top {_n}"], "train.lr_encoder": _lr}
# the text cache stored as float32 against the float16 default (both read back as float32)
ROWS["+ tune_top 1, text float32"] = {**ROWS["+ tune_top 1"], "text.dtype": "float32"}


def set_key(tree: dict, dotted: str, value) -> None:
    node = tree
    *parts, last = dotted.split(".")
    for p in parts:
        node = node[p]
    if last not in node:
        raise KeyError(f"params.yaml has no {dotted}")
    node[last] = value


def params_for(overrides: dict, seed: int | None, epochs: int | None) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = copy.deepcopy(params)
    params["datasets"][DATASET]["dir"] = str(REPO / params["datasets"][DATASET]["dir"])
    params["mner_datasets"] = [DATASET]
    for k, v in {**BASE, **overrides}.items():
        set_key(params, k, v)
    if seed is not None:
        set_key(params, "train.seed", seed)
    if epochs is not None:  # the dataset's own override wins over train.epochs: set it there
        params["datasets"][DATASET].setdefault("overrides", {}).setdefault("train", {})["epochs"] = epochs
    return params


def make_project(root: Path, params: dict) -> Path:
    """A scratch project; results of an earlier run with other params are removed."""
    text = yaml.safe_dump(params, sort_keys=False)
    if (root / "params.yaml").is_file() and (root / "params.yaml").read_text() != text:
        for sub in ("metrics", "reports", "models", "features", "data"):
            p = root / sub
            if p.is_symlink():
                p.unlink()
            elif p.exists():
                shutil.rmtree(p)
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(text)
    return root


def run(root: Path, *stage: str, log: Path) -> None:
    env = {**os.environ, "PIPELINE_ROOT": str(root), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    with open(log, "a") as f:
        # cwd is the scratch project: from REPO, DVCLive would find REPO's .dvc and write its
        # step signal file into REPO/.dvc/tmp/exps/run
        p = subprocess.run([sys.executable, "-m", *stage, DATASET], cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(stage)} failed in {root}; see {log}")


def text_key(overrides: dict) -> str:
    t = {k: v for k, v in sorted(overrides.items()) if k.startswith("text.")}
    return "text-" + "-".join(f"{k[5:]}={v}" for k, v in t.items()).replace(" ", "").replace("[", "").replace("]", "")


def build_text(work: Path, overrides: dict) -> Path:
    """Prepare + text stage for one text configuration (skipped when its report exists)."""
    text_only = {k: v for k, v in overrides.items() if k.startswith("text.")}  # one project per text config
    root = make_project(work / text_key(overrides), params_for(text_only, None, None))
    if not (root / "reports" / DATASET / "text.json").is_file():
        run(root, "stages.prepare", log=root / "log.txt")
        run(root, "stages.text", log=root / "log.txt")
    return root


def train_eval(work: Path, name: str, overrides: dict, seed: int, epochs: int | None) -> dict:
    text_root = build_text(work, overrides)
    slug = name.replace(" ", "_").replace("+", "plus").replace("(", "").replace(")", "")
    root = make_project(work / "runs" / f"{slug}-s{seed}", params_for(overrides, seed, epochs))
    metrics = root / "metrics" / DATASET / "mner.json"
    if not metrics.is_file():
        for sub in ("features", "data"):
            link = root / sub
            if not link.exists():
                link.symlink_to(text_root / sub)
        t0 = time.perf_counter()
        run(root, "stages.train", log=root / "log.txt")
        run(root, "stages.evaluate", log=root / "log.txt")
        print(f"  {name} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    m = json.loads(metrics.read_text())
    tr = json.loads((root / "reports" / DATASET / "train.json").read_text())
    per_epoch = tr["seconds"]["per_epoch"]
    return {"row": name, "seed": seed, "valid_f1": m["valid"]["f1"], "test_f1": m["test"]["f1"],
            "s_per_epoch": statistics.median(per_epoch), "best_epoch": tr["best_epoch"], "epochs": len(per_epoch)}


def speed(work: Path, rows: list[str], steps: int, rounds: int) -> str:
    """Training-step time of each row on the same batches, rows interleaved in every round
    (one process, one thread), so the ratios hold under a noisy neighbour. Needs the text caches."""
    import numpy as np
    import torch

    from pipeline.mner.model import MNERModel
    from pipeline.mner.train import optimizer_and_schedule, set_seed, train_step, training_setup

    prepared = {}
    for r in rows:
        os.environ["PIPELINE_ROOT"] = str(build_text(work, ROWS[r]))
        p = params_for(ROWS[r], 1, None)
        st = training_setup(DATASET, p["fusion"], p["train"], p["align"])
        set_seed(1)
        model = MNERModel(st.model_cfg)
        if model.text.top is not None:
            model.text.top.load_state_dict(st.encoder_state)
        model.train()
        opt, sched = optimizer_and_schedule(model, st.train_cfg, 10 ** 6)
        bs = st.train_cfg.batch_size
        order = np.random.default_rng(0).permutation(len(st.train_ds))[:steps * bs].tolist()
        batches = [st.collate_fn([st.train_ds[i] for i in order[k * bs:(k + 1) * bs]]) for k in range(steps)]
        train_step(model, batches[0], opt, sched, st.train_cfg)  # warm-up
        prepared[r] = (model, opt, sched, st.train_cfg, batches, -(-len(st.train_ds) // bs))
    times: dict[str, list[float]] = {r: [] for r in rows}
    for _ in range(rounds):
        for r in rows:
            model, opt, sched, cfg, batches, _ = prepared[r]
            t0 = time.perf_counter()
            for b in batches:
                train_step(model, b, opt, sched, cfg)
            times[r].append((time.perf_counter() - t0) / len(batches))
    ref = statistics.median(times[rows[-1]])
    lines = [f"Training steps on the same {steps} batches, rows interleaved, {rounds} rounds, "
             f"{torch.get_num_threads()} thread(s); s/epoch = median step x steps per epoch (no dev pass).", "",
             f"| setting | s / step | train s / epoch | vs {rows[-1]} |", "|---|---|---|---|"]
    for r in rows:
        m = statistics.median(times[r])
        lines.append(f"| {r} | {m:.3f} | {m * prepared[r][5]:.1f} | {m / ref:.2f} |")
    return "\n".join(lines)


def stat(xs: list[float]) -> str:
    xs = [100 * x for x in xs]
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def table(results: list[dict], rows: list[str]) -> str:
    lines = ["| setting | dev F1 | test F1 | s / epoch | best epoch | n |", "|---|---|---|---|---|---|"]
    for name in rows:
        rs = [r for r in results if r["row"] == name]
        if not rs:
            continue
        lines.append(f"| {name} | {stat([r['valid_f1'] for r in rs])} | {stat([r['test_f1'] for r in rs])} | "
                     f"{statistics.mean(r['s_per_epoch'] for r in rs):.1f} | "
                     f"{', '.join(str(r['best_epoch']) for r in rs)} | {len(rs)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--rows", nargs="+", default=TABLE_ROWS, help=f"row names (default: the table's); all: {list(ROWS)}")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs for every run")
    ap.add_argument("--work", type=Path, default=Path("/tmp/wnut17-bench"))
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table and the raw runs here")
    ap.add_argument("--speed", action="store_true",
                    help="only time training steps of the rows, interleaved in one process (last row = reference)")
    ap.add_argument("--steps", type=int, default=20, help="--speed: batches per round")
    ap.add_argument("--rounds", type=int, default=3, help="--speed: rounds")
    args = ap.parse_args()
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; have {list(ROWS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.speed:
        md = speed(args.work, args.rows, args.steps, args.rounds)
        print(md)
        if args.out:
            args.out.write_text(md + "\n")
        return
    # text caches first (one per configuration), then the runs, most expensive first
    keys = {text_key(ROWS[r]): ROWS[r] for r in args.rows}
    with ThreadPoolExecutor(args.jobs) as ex:
        list(ex.map(lambda o: build_text(args.work, o), keys.values()))
    jobs = [(r, s) for r in reversed(args.rows) for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as ex:
        results = list(ex.map(lambda rs: train_eval(args.work, rs[0], ROWS[rs[0]], rs[1], args.epochs), jobs))
    md = table(results, args.rows)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
