"""The long benchmark, on demand (`make bench-10m`): 10,000,000 vectors through the store, as
IVF-PQ in a 4 GiB budget.

The same clustered 512-d mixture as the ann section of `make bench`, loaded into a real index
folder as captions with `Store.write(index_vectors=False)` (a bulk load: catalog rows and
embeddings only, about 21 GB of SQLite), then `Store.fit()` builds the vector file as `auto`
chooses it for that many vectors in 4 GiB: trained on a sample, filled block by block from the
catalog, tuned to recall@10 ≥ 0.95 where it can reach it. Queries then go through
`Store.nearest`, which re-ranks the candidates by the catalog's exact embeddings.

Reported: load and build times (by phase), the vector file's size against the budget, the
process's peak memory, the tuned settings and, for fresh queries from the mixture, recall@10
against exact search and the p50/p99 latency of one query.

    .venv/bin/python -m tests.bench.ann_10m [--count N] [--out FILE] [--dir SCRATCH]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from indexer.models.identity import ModelId
from indexer.store import NewCaption, Store
from indexer.store.vectors import TuningQueries
from tests.bench.ann_bench import DIM, mixture

BLOCK = 100_000
MODEL = ModelId("synthetic", None, "0" * 64, DIM, 224)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000_000)
    parser.add_argument("--out", default="bench-10m-report.json")
    parser.add_argument("--dir", help="scratch folder for the index (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        report = run(Path(scratch) / "index", args.count)
    Path(args.out).write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"report written to {args.out}")


def run(root: Path, count: int) -> dict:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, DIM)).astype(np.float32)
    fresh = mixture(100, rng, centres)
    truth = TuningQueries(np.full(len(fresh), -1), fresh)  # exact top 10, gathered as the vectors are made
    report: dict = {"count": count}
    with Store.open(root, write=True, create=True) as store:
        store.claim_model(MODEL, None)
        started = time.perf_counter()
        for start in range(0, count, BLOCK):
            vectors = mixture(min(BLOCK, count - start), rng, centres)
            with store.write(index_vectors=False) as writer:
                ids = writer.add_captions(
                    "bench", [NewCaption(str(start + n), None, None, vector) for n, vector in enumerate(vectors)]
                )
            truth.update(np.asarray(ids), vectors)
            if (start // BLOCK) % 10 == 9:
                print(f"  loaded {start + len(vectors):,} ({time.perf_counter() - started:.0f} s)", flush=True)
        report["load_s"] = time.perf_counter() - started
        catalog_bytes = sum(path.stat().st_size for path in root.glob("catalog.sqlite*"))
        print(f"loaded {count:,} vectors in {report['load_s']:.0f} s; catalog {catalog_bytes / 2**30:.1f} GiB")

        phases: dict[str, float] = {}
        started = time.perf_counter()

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in phases:
                print(f"  {time.perf_counter() - started:6.0f} s  {phase}", flush=True)
            phases.setdefault(phase, time.perf_counter() - started)
            if total and done and done % 1_000_000 == 0:
                print(f"  {time.perf_counter() - started:6.0f} s    {done:,} of {total:,}", flush=True)

        spec = store.fit(progress)["text"]
        build_s = time.perf_counter() - started
        size = (root / "text.faiss").stat().st_size
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        report.update(
            spec=spec.to_dict(),
            build_s=build_s,
            phases_started_s=phases,
            index_bytes=size,
            catalog_bytes=catalog_bytes,
            peak_rss_bytes=peak,
        )
        print(f"{spec.describe()}: built in {build_s:.0f} s, {size / 2**30:.2f} GiB; peak RSS {peak / 2**30:.2f} GiB")

    with Store.open(root) as store:
        store.vectors("text")  # loaded once, as a warm engine holds it
        latencies, hits = [], 0
        for query, expected in zip(fresh, truth.truth(), strict=True):
            began = time.perf_counter()
            found, _ = store.nearest("text", query, 10)
            latencies.append((time.perf_counter() - began) * 1000)
            hits += len(np.intersect1d(found, expected))
    p50, p99 = np.percentile(latencies, [50, 99])
    report.update(recall=hits / (10 * len(fresh)), p50_ms=float(p50), p99_ms=float(p99))
    print(f"fresh queries through Store.nearest: recall@10 {report['recall']:.3f}, p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    return report


if __name__ == "__main__":
    main()
