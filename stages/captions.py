"""DVC stage `captions@<dataset>`: CLIP text embeddings of captions, entity prompts and entity-masked captions."""
import argparse

from pipeline.extract.captions import extract_captions
from pipeline.params import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("dataset", help="a retrieval dataset name from params.yaml `retrieval_datasets`")
    args = ap.parse_args()
    params = load_params("captions", item=args.dataset)
    r = extract_captions(args.dataset, params)
    print(f"captions {args.dataset}: {r['captions']} captions ({r['by_split']}), {r['entities_kept']} entities "
          f"in {r['slots']} slots, {r['distinct_texts_encoded']} distinct texts -> features/{args.dataset}/captions")


if __name__ == "__main__":
    main()
