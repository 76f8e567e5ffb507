"""Stage `demo`: generate the embedded demo dataset (MNER tweets + retrieval set) under data/demo."""
from __future__ import annotations

import json
import time

from pipeline.cli import run_stage, stage_parser
from pipeline.data.demo import DemoSpec, generate_demo
from pipeline.params import load_params
from pipeline.paths import project_path


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("demo", __doc__)
    ap.add_argument("--out", default="data/demo", help="output folder (default: data/demo, the DVC out)")
    args = ap.parse_args(argv)
    spec = DemoSpec.from_params(load_params("demo")["demo"])
    t0 = time.perf_counter()
    summary = generate_demo(spec, project_path(args.out))
    counts = {"tweets": summary["tweets"]["tweets"], "flickr_images": summary["flickr"]["images"],
              "flickr_captions": summary["flickr"]["captions"]}
    print(f"demo: wrote {args.out} in {time.perf_counter() - t0:.2f} s: {json.dumps(counts)}")


if __name__ == "__main__":
    raise SystemExit(run_stage("demo", main))
