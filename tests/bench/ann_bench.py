"""Approximate index kinds against exact search, on clustered synthetic unit vectors in 512-d.

The data is a Gaussian mixture (1,000 centres, overlapping), normalised; queries are fresh draws from the same
mixture. Recall@10 is against exact search, after the exact re-ranking the store applies.

- 1,000,000 vectors: the kind `auto` chooses within the default 4 GiB budget, tuned as
  `clipseek optimize` tunes it, against exact flat search in the same run. Targets: recall@10
  ≥ 0.95 while a single query is at least 20× faster than flat, within the budget.
- The cost of verifying a vector file: the CRC-32 of the 1M-vector flat file, checked on every
  load, against reading the same bytes and against the whole load (checksum, then FAISS).
- Every kind on the first 200,000 of them (HNSW takes too long to build on two cores at 1M):
  build time, bytes per vector on disk, p50/p99 single-query latency, recall@10.
- Re-ranking through a real Store (50,000 vectors, ivfpq): from the memory-mapped embeddings
  in float32 and in float16, against re-ranking the same candidates from the catalog.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from indexer.models.identity import ModelId
from indexer.store import NewImage, Store
from indexer.store.building import quiet
from indexer.store.index_choice import DEFAULT_BUDGET, choose
from indexer.store.vectors import CHECKSUM_BLOCK, TuningQueries, VectorIndex, checksum, exact_top, rerank, tune

DIM = 512
LARGE, TABLE, MAPPED = 1_000_000, 200_000, 50_000
QUERIES = 200
NOISE = 1.2  # per dimension, against centres of about unit variance: clusters that overlap


def mixture(count: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    out = np.empty((count, DIM), np.float32)
    for start in range(0, count, 100_000):  # in blocks: the float64 draws of 1M rows would take 8 GB
        n = min(100_000, count - start)
        block = centres[rng.integers(0, len(centres), n)] + NOISE * rng.normal(size=(n, DIM)).astype(np.float32)
        out[start : start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def _measure(index: VectorIndex, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict:
    ids = np.arange(len(vectors))
    latencies, hits = [], 0
    for query, expected in zip(queries, truth, strict=True):
        started = time.perf_counter()
        if index.spec.exact:
            _, found = index.search(query[None], 10)
            best = found[0]
        else:
            _, found = index.search(query[None], index.candidates(10))
            row = found[0][found[0] >= 0]
            best, _ = rerank(query, row, vectors[row], 10)  # the store takes these from the catalog
        latencies.append((time.perf_counter() - started) * 1000)
        hits += len(np.intersect1d(best, ids[expected]))
    return {
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "recall": hits / truth.size,
    }


def _built(spec, vectors: np.ndarray) -> tuple[VectorIndex, float, float]:
    ids = np.arange(len(vectors))
    started = time.perf_counter()
    index = VectorIndex.build(DIM, ids, vectors, spec)
    queries = TuningQueries.drawn(ids, vectors)  # as the store tunes, its catalog being these arrays
    queries.update(ids, vectors)
    index = tune(index, queries, lambda wanted: (wanted, vectors[wanted]))
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "vectors.faiss"
        index.save(path, 0)
        size = path.stat().st_size
    return index, seconds, size / len(vectors)


def verification(index: VectorIndex) -> dict:
    """Seconds to checksum a saved vector file, to read its bytes, and to load it (both), from a
    warm page cache: the file was just written, as a reader after an index run finds it."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "vectors.faiss"
        index.save(path, 0)
        figures = {"bytes": path.stat().st_size}
        steps = (("read_s", _read), ("checksum_s", checksum), ("load_s", lambda file: VectorIndex.load(file, 0, 0)))
        for name, step in steps:
            started = time.perf_counter()
            step(path)
            figures[name] = time.perf_counter() - started
    return figures


def _read(path: Path) -> None:
    buffer = bytearray(CHECKSUM_BLOCK)
    with open(path, "rb", buffering=0) as source:
        while source.readinto(buffer):
            pass


def verification_row(figures: dict, count: int) -> tuple[str, str, str]:
    return (
        f"checksum of the {count:,}-vector flat file",
        f"{figures['checksum_s'] * 1000:.0f} ms",
        f"{figures['checksum_s'] / figures['read_s']:.1f}× reading its {figures['bytes'] / 2**30:.2f} GiB "
        f"({figures['read_s'] * 1000:.0f} ms); {figures['checksum_s'] / figures['load_s']:.0%} of a verified load "
        f"({figures['load_s'] * 1000:.0f} ms)",
    )


def mapped_reranking(count: int = MAPPED, kind: str = "ivfpq") -> dict:
    """p50/p99 of Store.nearest over `count` vectors of `kind`, its candidates re-ranked from the
    memory-mapped embeddings (float32, then float16) and from the catalog, with the same queries
    on the same index; and how many answers (ids and scores) agree with the catalog's."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(1000, DIM)).astype(np.float32)
    queries = mixture(QUERIES, rng, centres)
    figures = {"count": count, "kind": kind}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        with Store.open(root, write=True, create=True) as store:
            store.claim_model(ModelId("bench", None, "0" * 64, DIM, 224), None)
            for start in range(0, count, 10_000):
                with store.write(index_vectors=False) as writer:
                    vectors = mixture(min(10_000, count - start), rng, centres)
                    writer.add_images(
                        [
                            NewImage(f"/{start + n}".encode(), 1, 1, str(start + n), 1, 1, "", v)
                            for n, v in enumerate(vectors)
                        ]
                    )
            figures["spec"] = store.optimize(kind, progress=quiet)["image"].describe()
        figures["float32"], float32 = _nearest_timed(root, queries)
        aside = root / "aside"
        (root / "image.embeddings").rename(aside)
        figures["catalog"], reference = _nearest_timed(root, queries)
        aside.rename(root / "image.embeddings")
        figures["float32"]["same"] = _agreeing(float32, reference)
        with Store.open(root, write=True) as store:  # a budget float32 no longer fits in: float16
            index_bytes = count * store.vectors("image").spec.bytes_per_vector(DIM)
            store.index_setting(budget=index_bytes + 3 * DIM * count)
            store.catch_up()
        figures["float16"], answers = _nearest_timed(root, queries)
        figures["float16"]["same"] = _agreeing(answers, reference)
        figures["bytes"] = (root / "image.embeddings").stat().st_size
    return figures


def _nearest_timed(root: Path, queries: np.ndarray) -> tuple[dict, list]:
    """Latencies of a warm reader's Store.nearest for each query, and its answers."""
    with Store.open(root) as store:
        for query in queries[:20]:  # loads the index, maps the file, warms the page cache
            store.nearest("image", query, 10)
        latencies, answers = [], []
        for query in queries:
            started = time.perf_counter()
            ids, scores = store.nearest("image", query, 10)
            latencies.append((time.perf_counter() - started) * 1000)
            answers.append((ids.tolist(), scores.tolist()))
    return {"p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99))}, answers


def _agreeing(answers: list, reference: list) -> float:
    """The share of answers with the same ids in the same order and the same scores."""
    return sum(a == b for a, b in zip(answers, reference, strict=True)) / len(reference)


def mapped_rows(figures: dict) -> list[tuple[str, str, str]]:
    catalog = figures["catalog"]["p50_ms"]
    rows = [
        (
            f"{figures['count'] // 1000}k through the store: {figures['spec']}, re-ranked from the catalog",
            f"{catalog:.2f} ms",
            f"p50 per query (p99 {figures['catalog']['p99_ms']:.2f}), the baseline",
        )
    ]
    for precision in ("float32", "float16"):
        mapped = figures[precision]
        same = f"; {mapped['same']:.0%} of answers identical to the catalog's (ids, order, scores)"
        rows.append(
            (
                f"  re-ranked from the memory-mapped {precision} embeddings",
                f"{mapped['p50_ms']:.2f} ms",
                f"{catalog / mapped['p50_ms']:.1f}× faster (p99 {mapped['p99_ms']:.2f}){same}",
            )
        )
    return rows


def run(report: dict) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, DIM)).astype(np.float32)
    vectors = mixture(LARGE, rng, centres)
    queries = mixture(QUERIES, rng, centres)
    rows = []

    truth = exact_top(vectors, queries, 10)
    flat, _, _ = _built(choose(LARGE, DIM, "flat", budget=8 << 30)[0], vectors)
    exact = _measure(flat, vectors, queries, truth)
    report["1M verification"] = verified = verification(flat)
    del flat
    spec, _ = choose(LARGE, DIM, "auto", DEFAULT_BUDGET)
    chosen, build_seconds, per_vector = _built(spec, vectors)
    approximate = _measure(chosen, vectors, queries, truth)
    speedup = exact["p50_ms"] / approximate["p50_ms"]
    report["1M"] = {"flat": exact, "auto": {**approximate, "spec": chosen.spec.to_dict(), "build_s": build_seconds}}
    rows += [
        (
            f"exact flat, {LARGE:,} vectors",
            f"{exact['p50_ms']:.1f} ms",
            f"p50 per query (p99 {exact['p99_ms']:.1f}), the baseline",
        ),
        (
            f"auto → {chosen.spec.describe()}",
            f"{approximate['p50_ms']:.2f} ms",
            f"{speedup:.0f}× faster (target ≥ 20); recall@10 {approximate['recall']:.3f} (target ≥ 0.95)",
        ),
        (
            "  its build and size",
            f"{build_seconds:.0f} s",
            f"{per_vector:.0f} bytes/vector on disk: {per_vector * LARGE / 2**30:.2f} GiB of the 4 GiB budget",
        ),
        verification_row(verified, LARGE),
    ]
    del chosen

    subset = vectors[:TABLE]
    truth = exact_top(subset, queries, 10)
    for kind in ("flat", "hnsw", "ivf", "ivfpq"):
        index, seconds, per_vector = _built(choose(TABLE, DIM, kind)[0], subset)
        figures = _measure(index, subset, queries, truth)
        report[f"200k {kind}"] = {**figures, "build_s": seconds, "bytes_per_vector": per_vector}
        rows.append(
            (
                f"{TABLE // 1000}k: {index.spec.describe()}",
                f"{figures['p50_ms']:.2f} ms",
                f"p99 {figures['p99_ms']:.2f} ms, recall@10 {figures['recall']:.3f}, "
                f"built in {seconds:.1f} s, {per_vector:.0f} bytes/vector",
            )
        )
    del vectors, subset  # 2 GB: the store below holds its own
    report["mapped re-ranking"] = mapped = mapped_reranking()
    return rows + mapped_rows(mapped)
