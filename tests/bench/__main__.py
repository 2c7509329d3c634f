"""clipseek's benchmark suite (`make bench`): prints a table and writes a JSON report.

Figures are ratios against baselines measured in the same run (the machine's own float32
matrix-multiply rate, the untrimmed text path), so they compare across machines and runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

from tests.bench import (
    ann_bench,
    encoder_bench,
    indexer_bench,
    moderation_bench,
    query_bench,
    ray_bench,
    server_bench,
)

SECTIONS = {
    "encoder": encoder_bench.run,
    "query": query_bench.run,
    "ann": ann_bench.run,
    "indexing": indexer_bench.end_to_end,
    "rescan": indexer_bench.rescan,
    "ray": ray_bench.run,
    "server": server_bench.run,
    "moderation": moderation_bench.run,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-report.json", help="where to write the JSON report")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    args = parser.parse_args()

    report = {"machine": {"platform": platform.platform(), "python": platform.python_version()}, "started": time.time()}
    # A model cache of the run's own: ONNX exports are made once per run, and the user's cache is left alone.
    cache = tempfile.TemporaryDirectory(prefix="clipseek-bench-cache-")
    os.environ["CLIPSEEK_CACHE"] = cache.name
    for name in args.only or SECTIONS:
        print(f"\n== {name}")
        rows = SECTIONS[name](report.setdefault(name, {}))
        width = max(len(row[0]) for row in rows)
        for label, value, note in rows:
            print(f"  {label:<{width}}  {value:>12}  {note}")
    with open(args.out, "w", encoding="utf-8") as out:
        json.dump(report, out, indent=2)
    print(f"\nreport written to {args.out}")


if __name__ == "__main__":
    main()
