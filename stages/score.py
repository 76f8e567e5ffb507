"""DVC stage `score@<dataset>`: recall@K of every list, both directions, AGREE result files, plots.

Writes metrics/<ds>/retrieval.json (flat keys, percent), metrics/<ds>/agree/*.json (AGREE's
result format) and plots/<ds>/retrieval_recall.{csv,png}.
"""
from __future__ import annotations


from pipeline.cli import run_stage, stage_parser
from pipeline.params import load_params
from pipeline.paths import project_path
from pipeline.retrieval.data import read_ground_truth
from pipeline.retrieval.score_job import run_score


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser("score", __doc__, dataset="a retrieval dataset name from params.yaml `retrieval_datasets`")
    args = ap.parse_args(argv)
    ds = args.dataset
    params = load_params("score", item=ds)["score"]
    prepared = project_path(f"data/prepared/{ds}")
    t2i, i2t, _ = read_ground_truth(prepared, "test")
    r = run_score(project_path(f"predictions/{ds}/retrieval"), t2i, i2t, list(params["ks"]),
                  {"t2i": str(prepared / "captions.parquet"), "i2t": str(prepared / "gallery.parquet")},
                  project_path(f"metrics/{ds}/retrieval.json"), project_path(f"metrics/{ds}/agree"),
                  project_path(f"plots/{ds}/retrieval_recall.csv"), project_path(f"plots/{ds}/retrieval_recall.png"))
    m = r["metrics"]
    for d in ("t2i", "i2t"):
        print(f"score@{ds} {d}: " + "  ".join(
            f"{meth} {m[f'{d}_{meth}_mean']:.2f}" for meth in ("plain", "egr", "tbr", "egr_tbr")) + "  (mean recall %)")
    for n in r["notes"]:
        print(f"score@{ds}: note: {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage("score", main))
