"""DVC stage `prepare@<dataset>`: raw dataset files -> prepared manifests + report."""
import sys

from pipeline.artifacts import report_path, write_json
from pipeline.cli import run_stage, stage_parser
from pipeline.data.prepare import prepare_dataset
from pipeline.params import load_params


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("prepare", __doc__, dataset="a dataset name from params.yaml `datasets`")
    args = ap.parse_args(argv)
    params = load_params("prepare", item=args.dataset)
    ds = params["datasets"][args.dataset]
    report = prepare_dataset(args.dataset, ds.to_dict(), params["images"].to_dict(), f"data/prepared/{args.dataset}")
    write_json(report_path(args.dataset, "prepare"), report)
    for w in report.get("warnings", []):
        print(f"prepare@{args.dataset}: warning: {w['message']}", file=sys.stderr)
    imgs = report["images"]
    print(f"prepare {args.dataset}: {imgs['total']} images, {imgs['fallbacks']} fallbacks "
          f"({', '.join(f'{k}={v}' for k, v in imgs['counts'].items())}) -> data/prepared/{args.dataset}")


if __name__ == "__main__":
    raise SystemExit(run_stage("prepare", main))
