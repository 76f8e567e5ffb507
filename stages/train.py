"""DVC stage `train@<dataset>`: fit the MNER model on the cached features.

Reads params datasets.<dataset>, fusion, train, align; writes models/<dataset>/ and the
DVCLive curves in dvclive/<dataset>/train/ and the run report reports/<dataset>/train.json.
"""
from __future__ import annotations

import time

from pipeline.artifacts import report_path, write_json
from pipeline.cli import run_stage, stage_parser
from pipeline.mner.train import train_on_caches
from pipeline.params import load_params
from pipeline.paths import project_path


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser("train", __doc__, dataset="an MNER dataset name from params.yaml `datasets`")
    args = ap.parse_args(argv)
    params = load_params("train", item=args.dataset)
    t0 = time.perf_counter()
    res = train_on_caches(args.dataset, params["fusion"], params["train"], params["align"],
                          model_dir=project_path(f"models/{args.dataset}"),
                          live_dir=project_path(f"dvclive/{args.dataset}/train"))
    total = time.perf_counter() - t0
    write_json(report_path(args.dataset, "train"), {
        "best_epoch": res.best_epoch, "epochs_run": len(res.history), "best_valid": res.best_valid["micro"],
        "counts": res.counts, "seconds": {"total": total, "per_epoch": res.epoch_seconds}})
    print(f"train@{args.dataset}: best epoch {res.best_epoch}, valid F1 {res.best_valid['micro']['f1']:.4f}, "
          f"{len(res.history)} epochs in {total:.1f} s; image branches {res.counts['image_branches']}, "
          f"tuned encoder layers {res.counts['tune_top']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage("train", main))
