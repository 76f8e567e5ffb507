"""DVC stage `align_retrieval@<dataset>`: optional projection heads trained on the cached train split.

With `align_retrieval.enabled: false` (the default) it writes only a stub, so the zero-shot
path runs unchanged. Else it writes features/<ds>/aligned/{images,captions,heads}.parquet
(adapted test-split embeddings); its report (loss per epoch, t2i R@1 zero-shot vs aligned)
goes to reports/<ds>/align_retrieval.json.
"""
from __future__ import annotations


from pipeline.artifacts import report_path, write_json
from pipeline.cli import run_stage, stage_parser
from pipeline.params import load_params
from pipeline.paths import project_path
from pipeline.retrieval.align import AlignConfig, run_align, write_disabled
from pipeline.retrieval.data import load_retrieval_set


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser("align_retrieval", __doc__, dataset="a retrieval dataset name from params.yaml `retrieval_datasets`")
    args = ap.parse_args(argv)
    ds = args.dataset
    cfg = AlignConfig.from_params(load_params("align_retrieval", item=ds)["align_retrieval"])
    out = project_path(f"features/{ds}/aligned")
    report_file = report_path(ds, "align_retrieval")
    if not cfg.enabled:
        write_disabled(out)
        write_json(report_file, {"enabled": False})
        print(f"align_retrieval@{ds}: align_retrieval.enabled is false; zero-shot embeddings are used")
        return 0
    train = load_retrieval_set(ds, "zero_shot", split="train")
    test = load_retrieval_set(ds, "zero_shot", split="test")
    prov = {"stage": "align_retrieval", "dataset": ds, "train_fingerprint": train.fingerprint(),
            "test_fingerprint": test.fingerprint()}
    report = run_align(train, test, cfg, out, prov)
    write_json(report_file, {"enabled": True, **report})
    print(f"align_retrieval@{ds}: {cfg.epochs} epochs in {report['train_s']:.1f} s; test t2i R@1 "
          f"{report['test_t2i_r1']['zero_shot']:.2f} -> {report['test_t2i_r1']['aligned']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage("align_retrieval", main))
