"""The catalog on PostgreSQL (a server the bench starts, as the tests do: tests/postgres_server.py).

- Ingestion: pictures' rows (512-d float32 embeddings) committed in batches of 32, as an index
  run commits them, by 1, 2 and 4 writer processes at once, each on its own paths, against
  SQLite's single writer on the same machine: rows/s, and the ratio to SQLite's.
- A replica's catch-up: a reader (another Store, as a `clipseek serve` holds) that has searched
  the catalog; a writer commits 10,000 items in one transaction; the delay from that commit to
  the reader's first search that finds them (its vector index rebuilt from the catalog).
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from indexer.models.identity import ModelId
from indexer.store import NewImage, Store
from tests.postgres_server import PostgresServer

DIM = 512
BATCH = 32
ROWS = 8_192  # per configuration, shared among its writers
CATCH_UP = 10_000


def _images(start: int, count: int, seed: int) -> list[NewImage]:
    vectors = np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [
        NewImage(f"/bench/{start + n:08d}.jpg".encode(), 1, 1, f"{start + n:064x}", 8, 8, "2024-01-01", vector)
        for n, vector in enumerate(vectors)
    ]


def _writer(where: str, start: int, count: int, ready, go) -> None:
    images = _images(start, count, start)
    with Store.open(where, write=True) as store:
        ready.wait()
        go.wait()
        for first in range(0, count, BATCH):
            with store.write(index_vectors=False) as writer:
                writer.add_images(images[first : first + BATCH])


def _ingest(where: str, writers: int) -> float:
    """Rows/s of ROWS rows committed by `writers` processes at once."""
    context = multiprocessing.get_context("spawn")
    ready, go = context.Barrier(writers + 1), context.Event()
    share = ROWS // writers
    processes = [
        context.Process(target=_writer, args=(where, number * share, share, ready, go)) for number in range(writers)
    ]
    for process in processes:
        process.start()
    ready.wait()
    started = time.perf_counter()
    go.set()
    for process in processes:
        process.join()
        assert process.exitcode == 0, f"a writer failed ({process.exitcode})"
    return ROWS / (time.perf_counter() - started)


def _new(where: str) -> str:
    with Store.open(where, write=True, create=True) as store:
        store.claim_model(ModelId("bench", "random", None, DIM, 224), None)
    return where


def run(report: dict) -> list[tuple[str, str, str]]:
    folder, why = PostgresServer.find()
    if folder is None:
        return [("postgres", "skipped", why)]
    server = PostgresServer(folder).start()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            os.environ["CLIPSEEK_HOME"] = scratch
            sqlite = _ingest(_new(str(Path(scratch) / "sqlite-index")), 1)
            report["sqlite_rows_per_s"] = sqlite
            rows.append(("ingestion, SQLite, 1 writer", f"{sqlite:,.0f} rows/s", "the baseline"))
            for writers in (1, 2, 4):
                rate = _ingest(_new(server.new_database()), writers)
                report[f"postgres_{writers}_rows_per_s"] = rate
                rows.append(
                    (f"ingestion, PostgreSQL, {writers} writers", f"{rate:,.0f} rows/s", f"{rate / sqlite:.2f}× SQLite")
                )
            delay = _catch_up(_new(server.new_database()))
            report["replica_catch_up_s"] = delay
            label = f"replica catch-up, {CATCH_UP:,} items"
            rows.append((label, f"{delay:.2f} s", "from the commit to a search that finds them"))
    finally:
        server.stop()
    return rows


def _catch_up(where: str) -> float:
    images = _images(0, CATCH_UP + 100, 7)
    with Store.open(where, write=True) as writer, Store.open(where) as reader:
        with writer.write() as transaction:
            transaction.add_images(images[:100])
        probe = images[-1].vector
        reader.refresh()
        assert len(reader.nearest("image", probe, 10)[0]) == 10  # warm: its vector index is loaded
        with writer.write(index_vectors=False) as transaction:
            transaction.add_images(images[100:])
        committed = time.perf_counter()
        while True:
            reader.refresh()
            ids, _ = reader.nearest("image", probe, 1)
            if len(ids) and reader.catalog.items_by_id(ids)[int(ids[0])].display == "/bench/00010099.jpg":
                return time.perf_counter() - committed
