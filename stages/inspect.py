"""Look into a cache: ``python -m stages.inspect PATH [--id ID] [--check [--summary]] [--draw ID out.png]``.

PATH: a shard dir (features/<ds>/patches, .../regions) or one .h5 shard, a text or
caption feature dir, a Parquet file (e.g. data/prepared/<ds>/images.parquet), a model.pt
checkpoint, or any output folder (features/<ds>/retrieval, models/<ds>, predictions/<ds>).
With --check only the check's result is printed (--summary adds the summary before it).
Exit codes: 0 ok, 1 problems found by --check, 2 usage error or unreadable input.
Not a DVC stage: it reads no params and writes only the --draw picture.
"""
from __future__ import annotations

import argparse
import os
import sys

from pipeline.stores import inspect as I
from pipeline.stores.shards import ShardError
from pipeline.stores.tables import TableError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m stages.inspect", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="shard dir, .h5 shard, text/captions feature dir, or .parquet file")
    ap.add_argument("--id", dest="item_id", help="show one item: arrays with shapes, stats, a few values")
    ap.add_argument("--check", action="store_true",
                    help="integrity checks (every content digest verified); exit 1 if any problem")
    ap.add_argument("--summary", action="store_true", help="with --check: print the summary before the check")
    ap.add_argument("--draw", nargs=2, metavar=("ID", "OUT_PNG"), help="draw an image with its region boxes")
    ap.add_argument("--images-manifest", "--manifest", dest="manifest",
                    help="prepared manifest: image paths for --draw; the ids the cache must hold exactly once for "
                         "--check (default: data/prepared/<ds>/ beside features/<ds>/)")
    ap.add_argument("--min-side", type=int, default=0, help="--draw: upscale so the shorter side is at least this")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.draw:
            print(I.draw_regions(args.path, args.draw[0], args.draw[1], args.manifest, args.min_side))
            return 0
        if args.item_id is not None:
            print(I.show_item(args.path, args.item_id))
        elif not args.check or args.summary:
            print(I.summary(args.path))
        if args.check:
            manifest = args.manifest or I.default_manifest(args.path)
            if manifest is not None:
                print(f"check: against the manifest {manifest}")
            problems = I.check(args.path, manifest)
            if problems:
                print(f"check: {len(problems)} problem(s) in {args.path}:")
                for p in problems:
                    print(f"  - {p}")
                return 1
            print(f"check: ok ({args.path})")
        return 0
    except BrokenPipeError:  # `inspect ... | head` closed the pipe: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (I.InspectError, ShardError, TableError, OSError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"inspect: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
