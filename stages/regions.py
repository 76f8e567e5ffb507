"""DVC stage `regions@<dataset>`: object regions (Faster R-CNN or dataset boxes), CLIP-encoded -> HDF5 shards.

    python -m stages.regions <dataset> [--shard INDEX/COUNT]

``--shard i/n`` computes only shards i, i+n, ... (torchrun: RANK/WORLD_SIZE); done shards
whose fingerprint matches and whose digests verify are skipped, so a killed run resumes
where it stopped.
"""

from pipeline.cli import run_stage, stage_parser
from pipeline.extract.common import shards_line, stage_report_path
from pipeline.extract.images import extract_regions
from pipeline.params import load_params
from pipeline.stores.shards import resolve_shard_arg


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("regions", __doc__, dataset="a dataset name from params.yaml `datasets`")
    ap.add_argument("--shard", default=None, metavar="I/N", help="run shard worker I of N (default: all shards)")
    args = ap.parse_args(argv)
    index, count = resolve_shard_arg(args.shard)
    params = load_params("regions", item=args.dataset)
    r = extract_regions(args.dataset, params, shard_index=index, shard_count=count)
    print(f"regions {args.dataset} ({r['source']}): {shards_line(r)}, "
          f"{r['images_processed']} images, {r.get('regions', 0)} regions "
          f"({r['items_per_s']} img/s); report {stage_report_path(args.dataset, 'regions', index, count)}")


if __name__ == "__main__":
    raise SystemExit(run_stage("regions", main))
