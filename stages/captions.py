"""DVC stage `captions@<dataset>`: CLIP text embeddings of captions, entity prompts and entity-masked captions."""

from pipeline.cli import run_stage, stage_parser
from pipeline.extract.captions import extract_captions
from pipeline.params import load_params


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("captions", __doc__, dataset="a retrieval dataset name from params.yaml `retrieval_datasets`")
    args = ap.parse_args(argv)
    params = load_params("captions", item=args.dataset)
    r = extract_captions(args.dataset, params)
    resumed = (f", {r['parts_resumed']} finished chunk(s) of an earlier run reused "
               f"({r['captions'] - r['captions_encoded']} captions)" if r["parts_resumed"] else "")
    print(f"captions {args.dataset}: {r['captions']} captions ({r['by_split']}), {r['entities_kept']} entities "
          f"in {r['slots']} slots, {r['distinct_texts_encoded']} distinct texts{resumed} -> "
          f"features/{args.dataset}/captions")


if __name__ == "__main__":
    raise SystemExit(run_stage("captions", main))
