"""clipseek's benchmark suite (`make bench`): prints a table and writes a JSON report.

Figures are ratios against baselines measured in the same run (the machine's own float32
matrix-multiply rate, the untrimmed text path), so they compare across machines and runs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from tests.bench import (
    ann_bench,
    encoder_bench,
    indexer_bench,
    models_bench,
    moderation_bench,
    multilingual_bench,
    postgres_bench,
    query_bench,
    ray_bench,
    rerank_bench,
    server_bench,
)
from tests.bench.report import into_readme, machine, markdown

SECTIONS = {
    "encoder": encoder_bench.run,
    "query": query_bench.run,
    "ann": ann_bench.run,
    "indexing": indexer_bench.end_to_end,
    "rescan": indexer_bench.rescan,
    "ray": ray_bench.run,
    "server": server_bench.run,
    "moderation": moderation_bench.run,
    "models": models_bench.run,
    "multilingual": multilingual_bench.run,
    "postgres": postgres_bench.run,
    "rerank": rerank_bench.run,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-report.json", help="where to write the JSON report")
    parser.add_argument("--markdown", default="bench-report.md", help="where to write the Markdown table")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    parser.add_argument("--readme", type=Path, help="after a run of every section, put its table in this README")
    args = parser.parse_args()

    report = {"machine": machine(), "started": time.time()}
    tables = {}
    # A model cache of the run's own: ONNX exports are made once per run, and the user's cache is left alone.
    cache = tempfile.TemporaryDirectory(prefix="clipseek-bench-cache-")
    os.environ["CLIPSEEK_CACHE"] = cache.name
    for name in args.only or SECTIONS:
        print(f"\n== {name}")
        rows = tables[name] = SECTIONS[name](report.setdefault(name, {}))
        width = max(len(row[0]) for row in rows)
        for label, value, note in rows:
            print(f"  {label:<{width}}  {value:>12}  {note}")
    with open(args.out, "w", encoding="utf-8") as out:
        json.dump(report, out, indent=2)
    table = markdown(report, tables)
    Path(args.markdown).write_text(table, encoding="utf-8")
    print(f"\nreport written to {args.out} and {args.markdown}")
    if args.readme and not args.only:
        into_readme(args.readme, table)
        print(f"{args.readme}'s benchmark table replaced")


if __name__ == "__main__":
    main()
