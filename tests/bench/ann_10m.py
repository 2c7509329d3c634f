"""The long benchmark, on demand (`make bench-10m`): 10,000,000 vectors as IVF-PQ in a 4 GiB budget.

The same clustered 512-d mixture as the ann section of `make bench`, generated block by block
into a float16 memory-mapped file (10 GB on disk, the stand-in for the catalog's embeddings)
from which candidates are re-ranked exactly. The kind is the one `auto` chooses for that many
vectors in 4 GiB; it is trained on a sample and filled in blocks, as `clipseek optimize` does.
Reported: build time, the index's size against the budget, and for a ladder of nprobe the
recall@10 after exact re-ranking and the p50/p99 latency of one query (re-ranking included).

    .venv/bin/python -m tests.bench.ann_10m [--count N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from indexer.store.index_choice import DEFAULT_BUDGET, choose
from indexer.store.vectors import VectorIndex, rerank
from tests.bench.ann_bench import DIM, mixture

BLOCK = 250_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000_000)
    parser.add_argument("--out", default="bench-10m-report.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, DIM)).astype(np.float32)
    queries = mixture(100, rng, centres)
    report: dict = {"count": args.count}
    with tempfile.TemporaryDirectory() as scratch:
        stored = np.lib.format.open_memmap(Path(scratch) / "vectors.npy", "w+", np.float16, (args.count, DIM))
        started = time.perf_counter()
        for start in range(0, args.count, BLOCK):
            stored[start : start + BLOCK] = mixture(min(BLOCK, args.count - start), rng, centres)
        print(f"generated {args.count:,} vectors in {time.perf_counter() - started:.0f} s", flush=True)

        spec = choose(args.count, DIM, "auto", DEFAULT_BUDGET)
        started = time.perf_counter()
        sample = np.sort(rng.choice(args.count, min(args.count, spec.nlist * 50), replace=False))
        index = VectorIndex.build(DIM, None, stored[sample].astype(np.float32), spec)
        trained = time.perf_counter() - started
        for start in range(0, args.count, BLOCK):
            block = stored[start : start + BLOCK].astype(np.float32)
            index.add(np.arange(start, start + len(block)), block)
            print(f"  added {start + len(block):,}", flush=True)
        built = time.perf_counter() - started
        path = Path(scratch) / "vectors.faiss"
        index.save(path, 0)
        size = path.stat().st_size
        report.update(spec=spec.to_dict(), train_s=trained, build_s=built, index_bytes=size)
        print(f"{spec.describe()}: trained in {trained:.0f} s, built in {built:.0f} s, {size / 2**30:.2f} GiB on disk")

        scores = np.full((len(queries), 10), -np.inf, np.float32)
        truth = np.zeros((len(queries), 10), np.int64)
        for start in range(0, args.count, BLOCK):  # exact top 10, block by block
            block_scores = queries @ stored[start : start + BLOCK].astype(np.float32).T
            merged = np.concatenate([scores, block_scores], axis=1)
            ids = np.concatenate(
                [truth, np.broadcast_to(np.arange(start, start + block_scores.shape[1]), block_scores.shape)], axis=1
            )
            top = np.argsort(-merged, axis=1)[:, :10]
            scores, truth = np.take_along_axis(merged, top, axis=1), np.take_along_axis(ids, top, axis=1)

        rows = []
        for nprobe in (8, 16, 32, 64, 128):
            probed = index.with_settings(nprobe=nprobe)
            latencies, hits = [], 0
            for query, expected in zip(queries, truth, strict=True):
                started = time.perf_counter()
                _, found = probed.search(query[None], probed.candidates(10))
                candidates = np.sort(found[0][found[0] >= 0])
                best, _ = rerank(query, candidates, stored[candidates].astype(np.float32), 10)
                latencies.append((time.perf_counter() - started) * 1000)
                hits += len(np.intersect1d(best, expected))
            p50, p99 = np.percentile(latencies, [50, 99])
            rows.append({"nprobe": nprobe, "recall": hits / truth.size, "p50_ms": float(p50), "p99_ms": float(p99)})
            print(
                f"  nprobe {nprobe:>4}: recall@10 {hits / truth.size:.3f}, p50 {p50:.1f} ms, p99 {p99:.1f} ms",
                flush=True,
            )
        report["ladder"] = rows
    Path(args.out).write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"report written to {args.out}")


if __name__ == "__main__":
    main()
