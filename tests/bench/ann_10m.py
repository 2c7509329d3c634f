"""The long benchmark, on demand (`make bench-10m`): 10,000,000 vectors through the store, as
IVF-PQ in a 4 GiB budget, re-ranked from the memory-mapped embeddings.

The same clustered 512-d mixture as the ann section of `make bench`, loaded into a real index
folder as captions with `Store.write(index_vectors=False)` (a bulk load: catalog rows and
embeddings only, about 21 GB of SQLite), then `Store.fit()` builds the vector file as `auto`
chooses it for that many vectors in 4 GiB (trained on a sample, filled block by block from the
catalog, tuned to recall@10 ≥ 0.95 where it can reach it) and the embeddings file beside it
(`text.embeddings`, float16 at this size). Queries then go through `Store.nearest` in a fresh
process, as a server would run them, which re-ranks the candidates from that file.

Reported: load and build times (by phase), the vector file's size against the budget, the
embeddings file's precision and size, the peak memory of the loading and building process and
of the querying one, the tuned settings and, for fresh queries from the mixture, recall@10
against exact search and the p50/p99 latency of one query twice: first with the index's files
dropped from the page cache (cold: each candidate's row read from disk), then with the
embeddings file warmed as `clipseek serve` warms it at its start (warm: read and mapped
whole). Also where the re-ranking read its rows: the embeddings file, or the catalog (the file
missing or unsound), how many rows per query came from the catalog (for float16, the few hits
re-scored in float32), and how a query's time splits between the vector index, the catalog
and the rest (the re-ranking from the file).

    .venv/bin/python -m tests.bench.ann_10m [--count N] [--out FILE] [--dir SCRATCH | --keep FOLDER [--rebuild]]

`--keep FOLDER` keeps the built index, its queries and their exact answers in FOLDER; run again
with the same FOLDER, it measures the queries alone (seconds to minutes, as fast as the disk
reads the files back, where loading and building 10M take an hour), reporting the load and build
figures of the run that built it. With `--rebuild` it first builds the kept index's files anew
from its catalog, as `clipseek optimize` does (Store.optimize), and reports that build.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from indexer.models.identity import ModelId
from indexer.store import NewCaption, Store
from indexer.store.vectors import TuningQueries
from tests.bench.ann_bench import DIM, mixture

BLOCK = 100_000
QUERIES = 100
MODEL = ModelId("synthetic", None, "0" * 64, DIM, 224)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000_000)
    parser.add_argument("--out", default="bench-10m-report.json")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--dir", help="scratch folder for the index (default: a temporary one)")
    where.add_argument("--keep", metavar="FOLDER", help="build in FOLDER and keep it; query it again if built")
    parser.add_argument("--rebuild", action="store_true", help="with --keep: build the kept index's files anew first")
    args = parser.parse_args()
    if args.rebuild and not args.keep:
        parser.error("--rebuild needs --keep FOLDER")
    if args.keep:
        report = kept(Path(args.keep), args.count, args.rebuild)
    else:
        with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
            report = run(Path(scratch) / "index", args.count)
    Path(args.out).write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"report written to {args.out}")


def run(root: Path, count: int) -> dict:
    report, (warm, cold, expected) = built(root, count)
    report["queries"] = queried(root, warm, cold, expected)
    return report


def kept(folder: Path, count: int, rebuild: bool = False) -> dict:
    """run(), keeping the index and what its queries need in `folder`, or querying the one kept
    there (its vector files built anew first if `rebuild`)."""
    saved = folder / "built.json"
    if saved.exists():
        report = json.loads(saved.read_text(encoding="utf-8"))
        if report["count"] != count:
            raise SystemExit(f"{folder} holds {report['count']:,} vectors, not {count:,}: give another --keep folder")
        if rebuild:
            with Store.open(folder / "index", write=True) as store:
                report.update(build(store, rebuild=True))
            report["build_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            saved.write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(f"querying the index of {count:,} vectors kept in {folder} (its load figures as reported when loaded)")
        with np.load(folder / "queries.npz") as arrays:
            queries = arrays["warm"], arrays["cold"], arrays["truth"]
    else:
        folder.mkdir(parents=True, exist_ok=True)
        report, queries = built(folder / "index", count)
        np.savez(folder / "queries.npz", warm=queries[0], cold=queries[1], truth=queries[2])
        saved.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return {**report, "queries": queried(folder / "index", *queries)}


def built(root: Path, count: int) -> tuple[dict, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Load and build: the report so far, and the warm and cold queries with the exact top 10 of each."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, DIM)).astype(np.float32)
    warm = mixture(QUERIES, rng, centres)
    cold = mixture(QUERIES, np.random.default_rng(1), centres)  # its own stream: the data stays as it was
    # The exact top 10 of both sets, gathered as the vectors are made.
    truth = TuningQueries(np.full(2 * QUERIES, -1), np.concatenate([warm, cold]))
    report: dict = {"count": count}
    with Store.open(root, write=True, create=True) as store:
        store.claim_model(MODEL, None)
        report.update(load(store, rng, centres, count, truth))
        report.update(build(store))
    report["build_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"loading and building: peak RSS {report['build_peak_rss_bytes'] / 2**30:.2f} GiB")
    return report, (warm, cold, np.asarray(truth.truth()))


def queried(root: Path, warm: np.ndarray, cold: np.ndarray, expected: np.ndarray) -> dict:
    """The query phase, in a process of its own, so that its peak memory is the querying's alone."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(query, (root, warm, expected[:QUERIES], cold, expected[QUERIES:]))


def load(store: Store, rng: np.random.Generator, centres: np.ndarray, count: int, truth: TuningQueries) -> dict:
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
    load_s = time.perf_counter() - started
    catalog_bytes = sum(path.stat().st_size for path in store.root.glob("catalog.sqlite*"))
    print(f"loaded {count:,} vectors in {load_s:.0f} s; catalog {catalog_bytes / 2**30:.1f} GiB")
    return {"load_s": load_s, "catalog_bytes": catalog_bytes}


def build(store: Store, rebuild: bool = False) -> dict:
    """Store.fit() (or Store.optimize(), which builds anew, for `rebuild`), timed by phase."""
    phases: dict[str, float] = {}
    started = time.perf_counter()

    def progress(phase: str, done: int, total: int) -> None:
        if phase not in phases:
            print(f"  {time.perf_counter() - started:6.0f} s  {phase}", flush=True)
        phases.setdefault(phase, time.perf_counter() - started)
        if total and done and done % 1_000_000 == 0:
            print(f"  {time.perf_counter() - started:6.0f} s    {done:,} of {total:,}", flush=True)

    spec = (store.optimize(progress=progress) if rebuild else store.fit(progress))["text"]
    build_s = time.perf_counter() - started
    size, budget = (store.root / "text.faiss").stat().st_size, store.index_setting()[1]
    mapped, problem = store.reranking.open("text")
    if mapped is None:
        raise SystemExit(f"fit left no sound embeddings file: {store.reranking.path('text').name} {problem}")
    embeddings = {"dtype": mapped.stamp.dtype, "bytes": mapped.stamp.size, "rows": mapped.stamp.count}
    print(
        f"{spec.describe()}: built in {build_s:.0f} s, {size / 2**30:.2f} GiB of a {budget / 2**30:.0f} GiB"
        f" budget; text.embeddings {mapped.describe()}"
    )
    return {
        "spec": spec.to_dict(),
        "build_s": build_s,
        "phases_started_s": phases,
        "index_bytes": size,
        "memory_budget_bytes": budget,
        "embeddings": embeddings,
    }


class Fallbacks(logging.Handler):
    """The re-ranking's "re-ranking from the catalog" lines (the embeddings file missing or unsound)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "re-ranking from the catalog" in record.getMessage():
            self.lines.append(record.getMessage())


def query(root: Path, warm: np.ndarray, warm_truth: list, cold: np.ndarray, cold_truth: list) -> dict:
    """The querying process: the cold set with the index's files out of the page cache, then the
    warm set with the embeddings file warmed as a server warms it."""
    fallbacks = Fallbacks()
    logger = logging.getLogger("clipseek")
    logger.addHandler(fallbacks)
    logger.setLevel(logging.INFO)
    for path in root.iterdir():
        if path.is_file():
            drop_from_page_cache(path)
    with Store.open(root) as store:
        opened, problem = store.reranking.open("text")
        # Rows the re-ranking reads from the catalog, and the time spent in the catalog and in
        # the vector index, query by query: counting pass-throughs.
        spent = Spent()
        store.catalog.embeddings_of = spent.counting("catalog", store.catalog.embeddings_of, rows=True)
        started = time.perf_counter()
        index = store.vectors("text")  # loaded once, as a warm engine holds it
        load_s = time.perf_counter() - started
        index.search = spent.counting("vector index", index.search)
        path = store.reranking.path("text")
        report = {"vector_file_load_s": load_s, "embeddings_cached_bytes_before_cold": cached_bytes(path)}
        report["cold"] = measure(store, cold, cold_truth, spent)
        started = time.perf_counter()
        store.reranking.warm()  # as `clipseek serve` warms it (SearchEngine.warm), here waited for
        report["warming_s"] = time.perf_counter() - started
        report["embeddings_cached_bytes_before_warm"] = cached_bytes(path)
        report["warm"] = measure(store, warm, warm_truth, spent)
    report["reranked_from"] = "text.embeddings" if opened is not None and not fallbacks.lines else "catalog"
    report["fallbacks"] = fallbacks.lines if opened is not None else [f"text.embeddings {problem}", *fallbacks.lines]
    report["memory"] = process_memory()
    for name in ("cold", "warm"):
        figures = report[name]
        print(
            f"{name} fresh queries through Store.nearest: recall@10 {figures['recall']:.3f},"
            f" p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms,"
            f" {figures['catalog_rows_per_query']:.1f} rows per query from the catalog;"
            f" of a mean query's {figures['mean_ms']:.1f} ms: vector index {figures['vector_index_ms']:.1f},"
            f" catalog {figures['catalog_ms']:.1f}, the rest (re-ranking from the file) {figures['rest_ms']:.1f}"
        )
    memory = report["memory"]
    print(
        f"re-ranked from {report['reranked_from']}; querying process: peak RSS {memory['peak_rss_bytes'] / 2**30:.2f}"
        f" GiB (now {memory['anonymous_bytes'] / 2**30:.2f} GiB anonymous,"
        f" {memory['file_bytes'] / 2**30:.2f} GiB file-backed)"
    )
    return report


class Spent:
    """Time spent in wrapped calls, and rows they returned, since the last clear()."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.rows = 0

    def clear(self) -> None:
        self.seconds, self.rows = {}, 0

    def counting(self, name: str, call, rows: bool = False):
        def counted(*args, **kwargs):
            began = time.perf_counter()
            answer = call(*args, **kwargs)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - began
            self.rows += len(answer[0]) if rows else 0
            return answer

        return counted


def measure(store: Store, queries: np.ndarray, truth: list, spent: Spent) -> dict:
    latencies, hits, from_catalog, parts = [], 0, 0, {"vector index": 0.0, "catalog": 0.0}
    for query, expected in zip(queries, truth, strict=True):
        spent.clear()
        began = time.perf_counter()
        found, _ = store.nearest("text", query, 10)
        latencies.append((time.perf_counter() - began) * 1000)
        hits += len(np.intersect1d(found, expected))
        from_catalog += spent.rows
        for name in parts:
            parts[name] += spent.seconds.get(name, 0.0) * 1000
    p50, p99 = np.percentile(latencies, [50, 99])
    mean = float(np.mean(latencies))
    index_ms, catalog_ms = (parts[name] / len(queries) for name in ("vector index", "catalog"))
    return {
        "recall": hits / (10 * len(queries)),
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "catalog_rows_per_query": from_catalog / len(queries),
        "mean_ms": mean,
        "vector_index_ms": index_ms,
        "catalog_ms": catalog_ms,
        "rest_ms": mean - index_ms - catalog_ms,
    }


def drop_from_page_cache(path: Path) -> None:
    """Written back, then out of the page cache: the next reads of this file go to the disk
    (this file only; the machine's other files keep their cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_bytes(path: Path) -> int | None:
    """How much of a file the page cache holds (util-linux's fincore; None without it)."""
    if shutil.which("fincore") is None:
        return None
    command = ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)]
    answer = subprocess.run(command, capture_output=True, text=True)
    return int(answer.stdout) if answer.returncode == 0 else None


def process_memory() -> dict:
    """This process's peak resident memory and what it holds now, anonymous (the vector index,
    Python) and file-backed (the libraries' code and the pages of the embeddings file it touched)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return {"peak_rss_bytes": fields["VmHWM"], "anonymous_bytes": fields["RssAnon"], "file_bytes": fields["RssFile"]}


if __name__ == "__main__":
    main()
