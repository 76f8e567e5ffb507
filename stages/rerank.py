"""DVC stage `rerank@<dataset>`: plain, EGR, TBR and EGR+TBR lists as AGREE prediction files.

Reads the candidate pools of `retrieve` and the embeddings they came from; writes
predictions/<ds>/retrieval/{texts,images}_<method>.jsonl and reports/<ds>/rerank.json.
The embeddings are streamed into float32 .npy files in a temporary dir ($TMPDIR; removed at
the end) and memory-mapped, the pools read and the queries re-ranked a block at a time, so
neither the gallery nor the pools need fit in RAM.
"""
from __future__ import annotations

import time

from pipeline.artifacts import read_parquet_provenance, report_path, write_json
from pipeline.cli import run_stage, stage_parser
from pipeline.params import load_params
from pipeline.paths import project_path
from pipeline.retrieval.agree_io import load_id_types
from pipeline.retrieval.data import load_retrieval_set, scratch_dir
from pipeline.retrieval.rerank_job import run_rerank


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser("rerank", __doc__, dataset="a retrieval dataset name from params.yaml `retrieval_datasets`")
    args = ap.parse_args(argv)
    ds = args.dataset
    params = load_params("rerank", item=ds)["rerank"]
    t0 = time.perf_counter()
    pool_dir = project_path(f"features/{ds}/retrieval")
    source = read_parquet_provenance(pool_dir / "t2i.parquet").get("source", "zero_shot")
    id_types = load_id_types(project_path(f"data/prepared/{ds}/meta.json"))
    prov = {"stage": "rerank", "dataset": ds, "source": source, "params": params.to_dict(), "id_types": id_types}
    with scratch_dir() as scratch:  # embeddings and the (Q, top_k) lists memory-mapped from a temp dir
        rs = load_retrieval_set(ds, source, scratch=scratch)
        report = run_rerank(rs, pool_dir, params, id_types, project_path(f"predictions/{ds}/retrieval"), prov,
                            scratch=scratch)
    report["total_s"] = round(time.perf_counter() - t0, 3)
    write_json(report_path(ds, "rerank"), report)
    print(f"rerank@{ds}: EGR {report['egr_s']:.3f} s, TBR {report['tbr_s']:.3f} s; lists changed vs plain: "
          + ", ".join(f"{k} {v}" for k, v in report["lists_changed_vs_plain"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage("rerank", main))
