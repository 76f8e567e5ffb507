"""DVC stage `evaluate@<dataset>`: score the trained MNER model on valid and test.

Reads ``evaluate.*`` (threads, batch size; the model itself comes from the checkpoint); writes predictions/<dataset>/*.conll,
metrics/<dataset>/mner.json, plots/<dataset>/ and reports/<dataset>/evaluate.json.
"""
from __future__ import annotations

import time

from pipeline.artifacts import report_path, write_json
from pipeline.cli import run_stage, stage_parser
from pipeline.extract.common import non_negative_int, positive_int
from pipeline.mner.evaluate import evaluate_on_caches
from pipeline.params import load_params
from pipeline.paths import project_path


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser("evaluate", __doc__, dataset="an MNER dataset name from params.yaml `datasets`")
    args = ap.parse_args(argv)
    p = load_params("evaluate", item=args.dataset)["evaluate"]
    t0 = time.perf_counter()
    ds = args.dataset
    report = evaluate_on_caches(ds, project_path(f"models/{ds}"), project_path(f"predictions/{ds}"),
                                project_path(f"metrics/{ds}/mner.json"), project_path(f"plots/{ds}"),
                                batch_size=positive_int(p["batch_size"], "evaluate.batch_size"),
                                threads=non_negative_int(p["threads"], "evaluate.threads"))
    for split in ("valid", "test"):
        r = report[split]
        print(f"evaluate@{ds} {split}: P {r['precision']:.4f} R {r['recall']:.4f} F1 {r['f1']:.4f} "
              f"({r['counts']['gold_entities']} gold, {r['counts']['pred_entities']} predicted entities)")
    total = time.perf_counter() - t0
    write_json(report_path(ds, "evaluate"), {"seconds": total, "counts": {s: report[s]["counts"] for s in ("valid", "test")}})
    print(f"evaluate@{ds}: {total:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage("evaluate", main))
