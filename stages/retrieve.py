"""DVC stage `retrieve@<dataset>`: FAISS top-`retrieval.pool` candidates, both directions, test split.

Embeddings: the zero-shot caches (features/<ds>/patches `pooled`, features/<ds>/captions),
or the align stage's adapted ones when `align_retrieval.enabled`. With `retrieval.index: ivfpq`
they are streamed into float32 .npy files in a temporary dir ($TMPDIR; removed at the end) and
memory-mapped, so the gallery need not fit in RAM. Writes
features/<ds>/retrieval/{t2i,i2t}.parquet and reports/<ds>/retrieve.json (timings).
"""
from __future__ import annotations

import time

from pipeline.artifacts import package_versions, report_path, write_json
from pipeline.cli import run_stage, stage_parser
from pipeline.params import load_params
from pipeline.paths import project_path
from pipeline.retrieval.data import load_retrieval_set
from pipeline.retrieval.retrieve_job import gallery_scratch, recall_line, run_retrieve


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser("retrieve", __doc__, dataset="a retrieval dataset name from params.yaml `retrieval_datasets`")
    args = ap.parse_args(argv)
    ds = args.dataset
    params = load_params("retrieve", item=ds)
    source = "aligned" if params["align_retrieval"]["enabled"] else "zero_shot"
    t0 = time.perf_counter()
    with gallery_scratch(params["retrieval"]) as scratch:  # ivfpq: embeddings memory-mapped from a temp dir
        rs = load_retrieval_set(ds, source, scratch=scratch)
        load_s = time.perf_counter() - t0
        prov = {"stage": "retrieve", "dataset": ds, "source": source, "embeddings_fingerprint": rs.fingerprint(),
                "image_cache": {"file": rs.info["image_file"], "fingerprint": rs.info["image_provenance"].get("fingerprint")},
                "caption_cache": {"file": rs.info["caption_file"],
                                  "fingerprint": rs.info["caption_provenance"].get("fingerprint")},
                "params": params["retrieval"].to_dict(), "versions": package_versions("faiss-cpu", "numpy")}
        report = run_retrieve(rs, params["retrieval"], project_path(f"features/{ds}/retrieval"), prov)
        info = {k: v for k, v in rs.info.items() if not k.endswith("_provenance")}
        write_json(report_path(ds, "retrieve"),
                   {**report, "set": info, "load_s": round(load_s, 3), "total_s": round(time.perf_counter() - t0, 3)})
        for d, r in report["directions"].items():
            print(f"retrieve@{ds} {d}: {r['queries']} queries x {r['gallery']} ({r['kind']}) "
                  f"in {r['search_s']:.3f} s{recall_line(r)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage("retrieve", main))
