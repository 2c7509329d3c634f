"""The catalog: an index's source of truth, in SQLite through SQLAlchemy (the only importer).

It holds every item (a picture or a caption) with its embedding, the files that failed and why,
the model identity and a generation counter that every committed change bumps. The vector files
are derived from it. SQLite runs in WAL mode, so readers are never blocked by the writer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np
from sqlalchemy import (
    Column,
    Connection,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    Row,
    String,
    Table,
    cast,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    update,
)

from indexer.errors import QueryError, StoreError

MODALITIES = ("image", "text")  # what an item is: a picture or a caption

SCHEMA_VERSION = 1

metadata = MetaData()
meta = Table("meta", metadata, Column("key", String, primary_key=True), Column("value", String, nullable=False))
items = Table(
    "items",
    metadata,
    # AUTOINCREMENT: ids are never reused, so a vector file can never map an old id to a new item.
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("modality", String, nullable=False),  # "image" | "text"
    Column("path", LargeBinary),  # image: the file path, bytes exactly as the OS gave them
    Column("display", String),  # image: the path as text, undecodable bytes replaced
    Column("caption", String),  # text
    Column("collection", String),  # text: its caption collection
    Column("ref", String),  # text: the id column of its caption file
    Column("image_ref", String),  # text: the image-path column of its caption file
    Column("size", Integer),
    Column("mtime_ns", Integer),
    Column("sha256", String),
    Column("width", Integer),
    Column("height", Integer),
    Column("taken_at", String),  # ISO 8601: EXIF date taken, else the file's modification time
    Column("added_at", Float, nullable=False),
    sqlite_autoincrement=True,
)
embeddings = Table(
    "embeddings",
    metadata,
    Column("item_id", Integer, ForeignKey("items.id"), primary_key=True),
    Column("vector", LargeBinary, nullable=False),  # float32, little-endian
)
failures = Table(
    "failures",
    metadata,
    Column("path", LargeBinary, primary_key=True),
    Column("display", String, nullable=False),
    Column("reason", String, nullable=False),
    Column("size", Integer),
    Column("mtime_ns", Integer),
    Column("at", Float, nullable=False),
)
_INDEXES = (
    "CREATE UNIQUE INDEX IF NOT EXISTS image_path ON items (path) WHERE modality = 'image'",
    "CREATE UNIQUE INDEX IF NOT EXISTS text_caption ON items (collection, caption) WHERE modality = 'text'",
    "CREATE INDEX IF NOT EXISTS item_hash ON items (sha256)",
)


class StoredImage(NamedTuple):  # a tuple: read for every indexed picture on every run
    """What the catalog knows of an indexed picture, enough to decide whether to look again."""

    id: int
    path: bytes
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class NewImage:
    path: bytes
    size: int
    mtime_ns: int
    sha256: str
    width: int
    height: int
    taken_at: str
    vector: np.ndarray


@dataclass(frozen=True)
class NewCaption:
    caption: str
    ref: str | None
    image_ref: str | None
    vector: np.ndarray


@dataclass(frozen=True)
class Filters:
    """Which items a search may return. `path` is a folder prefix, or a glob when it has * ? [."""

    path: str | None = None
    collection: str | None = None
    date_from: str | None = None  # ISO date or date-time, inclusive
    date_to: str | None = None  # ISO date (the whole day) or date-time, inclusive

    def any(self) -> bool:
        return any(value is not None for value in (self.path, self.collection, self.date_from, self.date_to))


def display_path(path: bytes) -> str:
    return path.decode("utf-8", "replace")


def _iso(text: str) -> str:
    """A date or date-time, checked and in the catalog's ISO 8601 form."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise QueryError(f"not a date: {text!r} (use YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS)") from None
    return parsed.date().isoformat() if len(text) == 10 else parsed.isoformat()


class Catalog:
    """One catalog.sqlite. Writes happen inside `write()`, which commits as one transaction."""

    def __init__(self, path: Path, readonly: bool = False):
        self.path = path
        url = f"sqlite:///file:{path}?mode=ro&uri=true" if readonly else f"sqlite:///{path}"
        self.engine = create_engine(url)
        event.listen(self.engine, "connect", self._on_connect)
        if not readonly:
            self._migrate()

    @staticmethod
    def _on_connect(connection, _record) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 10000")
        cursor.execute("PRAGMA synchronous = NORMAL")  # with WAL: a crash loses no committed batch
        cursor.close()

    def _migrate(self) -> None:
        with self.engine.begin() as connection:
            # 16 KiB pages hold seven 512-d float32 embeddings (88% full); SQLite's default 4 KiB pages
            # hold one, half empty. It only takes effect on a new file, before WAL mode is set.
            connection.exec_driver_sql("PRAGMA page_size = 16384")
            connection.exec_driver_sql("PRAGMA journal_mode = WAL")
            version = connection.exec_driver_sql("PRAGMA user_version").scalar()
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer clipseek (schema {version}); upgrade clipseek")
            if version < 1:
                metadata.create_all(connection)
                for statement in _INDEXES:
                    connection.exec_driver_sql(statement)
                connection.execute(insert(meta).values(key="generation", value="0"))
                connection.exec_driver_sql(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
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
        parameters = [compiled.params[name] for name in compiled.positiontup]
        with self.engine.connect() as connection:
            cursor = connection.connection.driver_connection.execute(str(compiled), parameters)
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
            .order_by(embeddings.c.item_id)
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
        found: dict[int, bytes] = {}
        with self.engine.connect() as connection:
            for start in range(0, len(asked), 10_000):  # under SQLite's limit of bound parameters
                chunk = asked[start : start + 10_000]
                query = select(embeddings.c.item_id, embeddings.c.vector).where(embeddings.c.item_id.in_(chunk))
                found.update((row[0], row[1]) for row in connection.execute(query))
        present = [i for i in asked if i in found]
        if not present:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        return _unpacked([(i, found[i]) for i in present])

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
                query = query.where(items.c.display.op("GLOB")(filters.path))
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
        """SQLite's integrity_check, and items whose embedding is missing; empty when sound."""
        with self.engine.connect() as connection:
            found = [row[0] for row in connection.exec_driver_sql("PRAGMA integrity_check")]
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
        as the vectors_changed generation of each modality whose vectors it changed."""
        with self.engine.begin() as connection:
            writer = Writer(connection)
            yield writer
            if writer.changed:
                connection.execute(
                    update(meta).where(meta.c.key == "generation").values(value=cast(meta.c.value, Integer) + 1)
                )
                generation = connection.execute(select(meta.c.value).where(meta.c.key == "generation")).scalar()
                stamps = {"updated_at": str(time.time())}
                stamps.update({f"vectors_changed.{modality}": generation for modality in writer.modalities})
                connection.execute(
                    insert(meta).prefix_with("OR REPLACE"), [{"key": k, "value": v} for k, v in stamps.items()]
                )


def _unpacked(rows: list[tuple[int, bytes]]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 embeddings) from (item_id, blob) rows."""
    ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
    return ids, np.frombuffer(b"".join(row[1] for row in rows), dtype="<f4").reshape(len(rows), -1)


class Writer:
    """The changes one transaction can make; see Catalog.write."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self.changed = False
        self.modalities: set[str] = set()  # whose vectors this transaction adds or removes

    def set(self, key: str, value: str | dict) -> None:
        value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        self.connection.execute(insert(meta).prefix_with("OR REPLACE").values(key=key, value=value))
        self.changed = True

    def _add_items(self, rows: list[dict], vectors: Iterable[np.ndarray]) -> list[int]:
        self.modalities.update(row["modality"] for row in rows)
        # One statement for the whole batch (SQLAlchemy's insertmanyvalues), ids in the rows' order:
        # eight times faster than a statement per row (measured on 20,000 captions).
        ids = list(
            self.connection.execute(insert(items).returning(items.c.id, sort_by_parameter_order=True), rows).scalars()
        )
        self.connection.execute(
            insert(embeddings),
            [{"item_id": i, "vector": v.astype("<f4").tobytes()} for i, v in zip(ids, vectors, strict=True)],
        )
        self.changed = True
        return ids

    def add_images(self, images: list[NewImage]) -> list[int]:
        if not images:
            return []
        now = time.time()
        rows = [
            {
                "modality": "image",
                "path": image.path,
                "display": display_path(image.path),
                "size": image.size,
                "mtime_ns": image.mtime_ns,
                "sha256": image.sha256,
                "width": image.width,
                "height": image.height,
                "taken_at": image.taken_at,
                "added_at": now,
            }
            for image in images
        ]
        self.forget_failures([image.path for image in images])
        return self._add_items(rows, (image.vector for image in images))

    def add_captions(self, collection: str, captions: list[NewCaption]) -> list[int]:
        if not captions:
            return []
        now = time.time()
        rows = [
            {
                "modality": "text",
                "caption": c.caption,
                "collection": collection,
                "ref": c.ref,
                "image_ref": c.image_ref,
                "added_at": now,
            }
            for c in captions
        ]
        return self._add_items(rows, (c.vector for c in captions))

    def move_image(self, item_id: int, path: bytes, size: int, mtime_ns: int) -> None:
        """A picture found under a new path with the same content keeps its id and embedding."""
        self.connection.execute(
            update(items)
            .where(items.c.id == item_id)
            .values(path=path, display=display_path(path), size=size, mtime_ns=mtime_ns)
        )
        self.forget_failures([path])
        self.changed = True

    def touch_image(self, item_id: int, size: int, mtime_ns: int) -> None:
        """Same path, same content, new file time (a copy back, a touch): nothing to embed."""
        self.connection.execute(update(items).where(items.c.id == item_id).values(size=size, mtime_ns=mtime_ns))
        self.changed = True

    def delete_items(self, ids: list[int]) -> None:
        for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            chunk = ids[start : start + 500]
            query = select(items.c.modality).where(items.c.id.in_(chunk)).distinct()
            self.modalities.update(self.connection.execute(query).scalars())
            self.connection.execute(delete(embeddings).where(embeddings.c.item_id.in_(chunk)))
            self.connection.execute(delete(items).where(items.c.id.in_(chunk)))
        self.changed = self.changed or bool(ids)

    def collection_ids(self, collection: str) -> list[int]:
        query = select(items.c.id).where(items.c.modality == "text", items.c.collection == collection)
        return list(self.connection.execute(query).scalars())

    def record_failure(self, path: bytes, reason: str, size: int | None, mtime_ns: int | None) -> None:
        row = {"path": path, "display": display_path(path), "reason": reason, "size": size, "mtime_ns": mtime_ns}
        self.connection.execute(insert(failures).prefix_with("OR REPLACE").values(**row, at=time.time()))
        self.changed = True

    def forget_failures(self, paths: list[bytes]) -> None:
        for start in range(0, len(paths), 500):
            self.connection.execute(delete(failures).where(failures.c.path.in_(paths[start : start + 500])))
        self.changed = self.changed or bool(paths)
