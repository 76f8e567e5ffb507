"""DVC stage `text@<dataset>`: frozen text encoder -> word features (first sub-word) + type-prompt features."""
import argparse

from pipeline.extract.text import extract_text
from pipeline.params import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("dataset", help="an MNER dataset name from params.yaml `mner_datasets`")
    args = ap.parse_args()
    params = load_params("text", item=args.dataset)
    r = extract_text(args.dataset, params)
    print(f"text {args.dataset}: {r['samples']} samples, {r['words']} words, {r['words_truncated']} truncated "
          f"({r['samples_truncated']} samples), types {', '.join(r['types'])} -> features/{args.dataset}/text")


if __name__ == "__main__":
    main()
