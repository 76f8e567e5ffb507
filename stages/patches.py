"""DVC stage `patches@<dataset>`: CLIP pooled embeddings + patch tokens of every image -> HDF5 shards.

    python -m stages.patches <dataset> [--shard INDEX/COUNT]

``--shard i/n`` computes only shards i, i+n, ... (any scheduler can run workers side by side;
under torchrun RANK/WORLD_SIZE are used); it changes nothing else. Done shards whose
fingerprint matches and whose digests verify are skipped, so a killed run resumes where it stopped.
"""

from pipeline.cli import run_stage, stage_parser
from pipeline.extract.common import shards_line, stage_report_path
from pipeline.extract.images import extract_patches
from pipeline.params import load_params
from pipeline.stores.shards import resolve_shard_arg


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("patches", __doc__, dataset="a dataset name from params.yaml `datasets`")
    ap.add_argument("--shard", default=None, metavar="I/N", help="run shard worker I of N (default: all shards)")
    args = ap.parse_args(argv)
    index, count = resolve_shard_arg(args.shard)
    params = load_params("patches", item=args.dataset)
    r = extract_patches(args.dataset, params, shard_index=index, shard_count=count)
    print(f"patches {args.dataset}: {shards_line(r)}, "
          f"{r['images_processed']} images ({r['items_per_s']} img/s), fallbacks {r['fallbacks_by_reason'] or 0}; "
          f"report {stage_report_path(args.dataset, 'patches', index, count)}")


if __name__ == "__main__":
    raise SystemExit(run_stage("patches", main))
