"""DVC stage `text@<dataset>`: frozen text encoder -> word features (first sub-word) + type-prompt features."""

from pipeline.cli import run_stage, stage_parser
from pipeline.extract.text import extract_text
from pipeline.params import load_params


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("text", __doc__, dataset="an MNER dataset name from params.yaml `mner_datasets`")
    args = ap.parse_args(argv)
    params = load_params("text", item=args.dataset)
    r = extract_text(args.dataset, params)
    resumed = (f", {r['parts_resumed']} finished chunk(s) of an earlier run reused "
               f"({r['samples'] - r['samples_encoded']} samples)" if r["parts_resumed"] else "")
    print(f"text {args.dataset}: {r['samples']} samples, {r['words']} words, {r['words_truncated']} truncated "
          f"({r['samples_truncated']} samples), types {', '.join(r['types'])}{resumed} -> features/{args.dataset}/text")


if __name__ == "__main__":
    raise SystemExit(run_stage("text", main))
