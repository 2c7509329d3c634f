"""Re-ranking's cost: a warm text query through the Python API on a demo index (200 one-object and
40 two-object pictures, the bundled demo model), without re-ranking and with the demo matcher
re-scoring its first 10 and 30 candidates. p50 of 20 queries each; the ratio is against the
query without re-ranking, measured in the same run. Most of a re-ranked query's time is reading
and resizing the candidates' picture files, which the matcher reads whole.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from indexer.demo_pairs import write_pairs
from indexer.demo_world import write_library
from indexer.pipeline import Indexer
from search.engine import SearchEngine

RUNS = 20


def _p50(engine: SearchEngine, queries: list[str], rerank: int | None) -> float:
    engine.search(queries[0], k=10, rerank=rerank)  # loads the model, the vectors and the matcher
    times = []
    for number in range(RUNS):
        started = time.perf_counter()
        engine.search(queries[number % len(queries)], k=10, rerank=rerank)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def run(report: dict) -> list[tuple[str, str, str]]:
    with tempfile.TemporaryDirectory(prefix="clipseek-rerank-bench-") as folder:
        root = Path(folder)
        write_library(root / "library", count=200, seed=3)
        queries = [text for _, text in write_pairs(root / "library", count=40, seed=4)]
        with Indexer.open(root / "index", model="demo") as indexer:
            indexer.index([root / "library"])
        with SearchEngine.open(root / "index") as engine:
            plain = _p50(engine, queries, None)
            timed = {count: _p50(engine, queries, count) for count in (10, 30)}
    report.update(plain_ms=plain, **{f"rerank_{count}_ms": ms for count, ms in timed.items()})
    rows = [("text query, no re-ranking", f"{plain:.1f} ms", "p50, warm, demo model")]
    for count, ms in timed.items():
        rows.append((f"re-ranking {count} (demo matcher)", f"{ms:.1f} ms", f"p50; {ms / plain:.1f}× the plain query"))
    return rows
