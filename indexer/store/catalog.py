"""The catalog: an index's source of truth, through SQLAlchemy (with catalog_schema.py and
catalog_writer.py, its only importers), in an SQLite file or a PostgreSQL database.

It holds every item (a picture or a caption) with its embedding, the files that failed and why,
the model identity and a generation counter that every committed change bumps. The vector files
are derived from it. SQLite runs in WAL mode, so readers are never blocked by the writer;
PostgreSQL's readers never are either, and its writers may be many (catalog_writer.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import BigInteger, Row, String, cast, func, or_, select, update
from sqlalchemy.exc import DBAPIError

from indexer.errors import QueryError, StoreError
from indexer.store.catalog_schema import (
    MODALITIES,
    NewCaption,
    NewImage,
    StoredImage,
    check_exists,
    connect,
    display_path,
    embeddings,
    failures,
    glob_match,
    is_conflict,
    is_postgresql,
    items,
    meta,
    migrate,
    upsert,
)
from indexer.store.catalog_writer import Writer

READERS = 4  # connections reading a few embeddings at once (Catalog.embeddings_of)
SPREAD = 64  # at most this many embeddings are read that way; more are read in one query

__all__ = ["MODALITIES", "Catalog", "Filters", "NewCaption", "NewImage", "StoredImage", "Writer", "display_path"]


@dataclass(frozen=True)
class Filters:
    """Which items a search may return. `path` is a folder prefix, or a glob when it has * ? [."""

    path: str | None = None
    collection: str | None = None
    date_from: str | None = None  # ISO date or date-time, inclusive
    date_to: str | None = None  # ISO date (the whole day) or date-time, inclusive

    def any(self) -> bool:
        return any(value is not None for value in (self.path, self.collection, self.date_from, self.date_to))


def _iso(text: str) -> str:
    """A date or date-time, checked and in the catalog's ISO 8601 form."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise QueryError(f"not a date: {text!r} (use YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS)") from None
    return parsed.date().isoformat() if len(text) == 10 else parsed.isoformat()


class Catalog:
    """One catalog: an SQLite file (`where` a Path) or a PostgreSQL database (`where` its URL).
    Writes happen inside `write()`, which commits as one transaction. `name` says which catalog
    in messages, without a password."""

    def __init__(self, where: Path | str, readonly: bool = False, name: str | None = None, create: bool = True):
        self.name = name or str(where)
        self.engine = connect(where, self.name, readonly)
        self.concurrent = is_postgresql(self.engine)  # many writers at once (PostgreSQL)
        self.committed: set[int] = set()  # the generations this process committed
        # embeddings_of's few rows at once: its threads, their connections, its SQL by row count
        self._readers: ThreadPoolExecutor | None = None
        self._reader_connections, self._held, self._few_sql = threading.local(), [], {}
        try:
            if self.concurrent and (readonly or not create):  # an SQLite file's absence is told by Store.open
                check_exists(self.engine, self.name)
            if not readonly:
                migrate(self.engine, self.name)
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        if self._readers is not None:
            self._readers.shutdown()
            for connection in self._held:
                connection.close()
        self.engine.dispose()

    # -- reading ---------------------------------------------------------------------------

    def get(self, key: str) -> str | None:
        with self.engine.connect() as connection:
            return connection.execute(select(meta.c.value).where(meta.c.key == key)).scalar()

    def generation(self) -> int:
        return int(self.get("generation") or 0)

    def vectors_changed(self, modality: str) -> int:
        """The generation of the last commit that added or removed vectors of `modality`."""
        return int(self.get(f"vectors_changed.{modality}") or 0)

    def images(self) -> dict[bytes, StoredImage]:
        """Every indexed picture by path: read on every run, so read with the least overhead."""
        query = select(items.c.id, items.c.path, items.c.size, items.c.mtime_ns).where(items.c.modality == "image")
        return {row[1]: StoredImage._make(row) for row in self._plain_rows(query)}

    def image_hashes(self) -> dict[int, str]:
        """The content hash of every indexed picture, by id."""
        query = select(items.c.id, items.c.sha256).where(items.c.modality == "image")
        return dict(self._plain_rows(query))

    def _plain_rows(self, query) -> list[tuple]:
        """A large read as plain tuples straight from the driver. The SQL is still compiled by
        SQLAlchemy, with bound parameters; its Row objects cost more than the query itself for
        the 100,000s of rows a rescan reads (0.3 s against 0.09 s per 100,000, measured)."""
        with self._driver_cursor(query) as cursor:
            return cursor.fetchall()

    @contextmanager
    def _driver_cursor(self, query) -> Iterator:
        compiled = query.compile(dialect=self.engine.dialect)
        with self.engine.connect() as connection:
            driver = connection.connection.driver_connection
            if self.concurrent:
                # A server-side cursor, so that fetchmany streams (psycopg's client-side cursors hold
                # the whole result); binary, so that embeddings come as bytes, not hex text.
                cursor = driver.cursor(name="clipseek_read", binary=True)
                cursor.itersize = 10_000
                cursor.execute(str(compiled), compiled.params)
            else:
                cursor = driver.execute(str(compiled), [compiled.params[name] for name in compiled.positiontup])
            try:
                yield cursor
            finally:
                cursor.close()

    def failures(self) -> dict[bytes, tuple[int, int]]:
        """Failed files and the (size, mtime_ns) they failed with."""
        with self.engine.connect() as connection:
            rows = connection.execute(select(failures.c.path, failures.c.size, failures.c.mtime_ns))
            return {row.path: (row.size, row.mtime_ns) for row in rows}

    def failure_list(self) -> list[tuple[str, str]]:
        """(path, reason) of every failed file, by path."""
        query = select(failures.c.display, failures.c.reason).order_by(failures.c.display)
        with self.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(query)]

    def vectors(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """All ids and embeddings of one modality, ordered by id (in memory at once: small indexes and tests)."""
        blocks = list(self.vector_blocks(modality, 100_000))
        if not blocks:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        return np.concatenate([ids for ids, _ in blocks]), np.concatenate([vectors for _, vectors in blocks])

    def vector_blocks(self, modality: str, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every (ids, embeddings) of one modality, ordered by id, `size` rows at a time: one query,
        so one consistent snapshot, read in bounded memory however large the collection."""
        query = (
            select(embeddings.c.item_id, embeddings.c.vector)
            .join(items, items.c.id == embeddings.c.item_id)
            .where(items.c.modality == modality)
            # By the items' own key: ordered by embeddings.item_id instead, SQLite walks a partial
            # index of the items and sorts every row, vectors and all, in a temporary file (20 GB at 10M).
            .order_by(items.c.id)
        )
        with self._driver_cursor(query) as cursor:
            while rows := cursor.fetchmany(size):
                yield _unpacked(rows)

    def vector_sample(self, modality: str, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(ids, embeddings) of `count` items of one modality drawn at random (all when fewer), by id."""
        ids = np.sort(self.matching_ids(modality, Filters()))
        if len(ids) > count:
            ids = np.sort(np.random.default_rng(seed).choice(ids, count, replace=False))
        return self.embeddings_of(ids)

    def image_like(self, sha256: str) -> NewImage | None:
        """A stored picture with this content, to reuse its embedding and metadata for a copy."""
        query = (
            select(items, embeddings.c.vector)
            .join(embeddings, items.c.id == embeddings.c.item_id)
            .where(items.c.sha256 == sha256, items.c.modality == "image")
            .limit(1)
        )
        with self.engine.connect() as connection:
            row = connection.execute(query).first()
        if row is None:
            return None
        vector = np.frombuffer(row.vector, dtype="<f4")
        return NewImage(row.path, row.size, row.mtime_ns, sha256, row.width, row.height, row.taken_at, vector)

    def embeddings_of(self, ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, embeddings) of those of `ids` that exist, in the order asked."""
        asked = [int(i) for i in ids]
        if self.concurrent or not 1 < len(asked) <= SPREAD:
            found = dict(self._embedding_rows(asked))
        else:
            # A few rows, each most likely a read from the disk (a re-ranking's near-ties in a
            # catalog larger than the page cache): asked on several connections at once, whose
            # reads overlap (the driver lets go of the interpreter while SQLite reads): 12 rows
            # of a 23 GB catalog in half the time of reading them one after another.
            if self._readers is None:
                self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="clipseek-catalog")
            groups = [asked[start::READERS] for start in range(min(READERS, len(asked)))]
            found = {key: blob for rows in self._readers.map(self._read_embeddings, groups) for key, blob in rows}
        present = [i for i in asked if i in found]
        if not present:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        return _unpacked([(i, found[i]) for i in present])

    def _embedding_rows(self, asked: list[int]) -> list[tuple[int, bytes]]:
        rows = []
        with self.engine.connect() as connection:
            for start in range(0, len(asked), 10_000):  # under SQLite's limit of bound parameters
                chunk = asked[start : start + 10_000]
                query = select(embeddings.c.item_id, embeddings.c.vector).where(embeddings.c.item_id.in_(chunk))
                rows += [(row[0], row[1]) for row in connection.execute(query)]
        return rows

    def _read_embeddings(self, asked: list[int]) -> list[tuple[int, bytes]]:
        """In a reader thread: `asked`'s rows on the thread's own driver connection, kept open,
        by SQL compiled once per count (SQLAlchemy's per-query work would hold the interpreter
        longer than SQLite takes to read the rows)."""
        connection = getattr(self._reader_connections, "connection", None)
        if connection is None:
            connection = self._reader_connections.connection = self.engine.raw_connection()
            self._held.append(connection)
        if len(asked) not in self._few_sql:
            query = select(embeddings.c.item_id, embeddings.c.vector).where(embeddings.c.item_id.in_(asked))
            compiled = query.compile(dialect=self.engine.dialect, compile_kwargs={"render_postcompile": True})
            self._few_sql[len(asked)] = str(compiled)
        cursor = connection.cursor()
        try:
            return cursor.execute(self._few_sql[len(asked)], asked).fetchall()
        finally:
            cursor.close()

    def embedding(self, item_id: int) -> np.ndarray | None:
        with self.engine.connect() as connection:
            blob = connection.execute(select(embeddings.c.vector).where(embeddings.c.item_id == item_id)).scalar()
        return None if blob is None else np.frombuffer(blob, dtype="<f4")

    def items_by_id(self, ids: Iterable[int]) -> dict[int, Row]:
        query = select(items).where(items.c.id.in_([int(i) for i in ids]))
        with self.engine.connect() as connection:
            return {row.id: row for row in connection.execute(query)}

    def collections(self) -> list[str]:
        query = select(items.c.collection).where(items.c.collection.is_not(None)).distinct()
        with self.engine.connect() as connection:
            return sorted(connection.execute(query).scalars())

    def matching_ids(self, modality: str, filters: Filters) -> np.ndarray:
        """Ids of the items of `modality` that pass `filters` (all bound parameters, no SQL text)."""
        query = select(items.c.id).where(items.c.modality == modality)
        if filters.path is not None:
            if any(character in filters.path for character in "*?["):
                query = query.where(glob_match(self.engine, items.c.display, filters.path))
            else:
                folder = filters.path.rstrip("/") or "/"
                inside = items.c.display.startswith(folder.rstrip("/") + "/", autoescape=True)
                query = query.where(or_(items.c.display == folder, inside))
        if filters.collection is not None:
            query = query.where(items.c.collection == filters.collection)
        if filters.date_from is not None:
            query = query.where(items.c.taken_at >= _iso(filters.date_from))
        if filters.date_to is not None:
            end = _iso(filters.date_to)
            if len(end) == 10:  # a whole day: every time on it sorts before "T99"
                end += "T99"
            query = query.where(items.c.taken_at <= end)
        with self.engine.connect() as connection:
            return np.fromiter(connection.execute(query).scalars(), dtype=np.int64)

    def captions(self, collection: str) -> set[str]:
        query = select(items.c.caption).where(items.c.modality == "text", items.c.collection == collection)
        with self.engine.connect() as connection:
            return set(connection.execute(query).scalars())

    def counts(self) -> list[tuple[str, str | None, int]]:
        """(modality, collection, items) for every modality and collection."""
        query = (
            select(items.c.modality, items.c.collection, func.count())
            .group_by(items.c.modality, items.c.collection)
            .order_by(items.c.modality, items.c.collection)
        )
        with self.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(query)]

    def count_after(self, modality: str, item_id: int) -> int:
        """Items of `modality` with ids above `item_id`: those added since (ids only grow)."""
        query = select(func.count()).where(items.c.id > item_id, items.c.modality == modality)
        with self.engine.connect() as connection:
            return connection.execute(query).scalar()

    def failure_count(self) -> int:
        with self.engine.connect() as connection:
            return connection.execute(select(func.count()).select_from(failures)).scalar()

    def integrity_problems(self) -> list[str]:
        """SQLite's integrity_check (PostgreSQL's server keeps its own), and items whose embedding
        is missing; empty when sound."""
        with self.engine.connect() as connection:
            check = [] if self.concurrent else connection.exec_driver_sql("PRAGMA integrity_check")
            found = [row[0] for row in check] or ["ok"]
            problems = [] if found == ["ok"] else [f"SQLite integrity_check: {line}" for line in found]
            orphans = connection.execute(
                select(func.count()).select_from(items.outerjoin(embeddings)).where(embeddings.c.item_id.is_(None))
            ).scalar()
        if orphans:
            problems.append(f"{orphans} items have no embedding")
        return problems

    # -- writing ---------------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[Writer]:
        """One transaction; the generation is bumped when it commits with changes, and recorded
        as the vectors_changed generation of each modality whose vectors it changed.

        The bump is the transaction's last statement: on PostgreSQL its row lock orders the
        commits of concurrent writers, each getting the next generation, held only while it commits.
        """
        try:
            with self.engine.begin() as connection:
                writer = Writer(connection, self.engine)
                yield writer
                if writer.changed:
                    generation = cast(cast(meta.c.value, BigInteger) + 1, String)
                    bumped = update(meta).where(meta.c.key == "generation").values(value=generation)
                    writer.generation = int(connection.execute(bumped.returning(meta.c.value)).scalar())
                    stamps = {**writer.settings, "updated_at": str(time.time())}
                    stamps.update({f"vectors_changed.{m}": str(writer.generation) for m in writer.modalities})
                    rows = [{"key": key, "value": value} for key, value in sorted(stamps.items())]
                    connection.execute(upsert(self.engine, meta, "key"), rows)
            if writer.generation is not None:  # committed: a rolled-back number is the next writer's
                self.committed.add(writer.generation)
        except DBAPIError as error:
            if not is_conflict(error):
                raise
            raise StoreError(
                f"a change to the catalog at {self.name} collided with a concurrent writer's "
                f"({str(error.orig).strip().splitlines()[0]}); "
                "nothing of it was kept: run the command again"
            ) from None


def _unpacked(rows: list[tuple[int, bytes]]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 embeddings) from (item_id, blob) rows."""
    ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
    return ids, np.frombuffer(b"".join(row[1] for row in rows), dtype="<f4").reshape(len(rows), -1)
