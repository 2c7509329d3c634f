"""The catalog's tables, its records, and the two databases that hold them: an SQLite file (the
embedded default, one writer at a time) or a PostgreSQL database (many writers, many machines),
both through SQLAlchemy. What differs between the two (connecting, creating the schema, upserts,
glob filters) is here; catalog.py and catalog_writer.py are the same for both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    insert,
    select,
    text,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, NoSuchModuleError

from indexer.errors import IndexNotFoundError, StoreError

MODALITIES = ("image", "text")  # what an item is: a picture or a caption

SCHEMA_VERSION = 1
# 64-bit on PostgreSQL (nanosecond file times, sizes past 2 GB); SQLite's INTEGER is 64-bit already,
# and its row id alias must be spelled INTEGER.
Int64 = BigInteger().with_variant(Integer, "sqlite")

metadata = MetaData()
meta = Table("meta", metadata, Column("key", String, primary_key=True), Column("value", String, nullable=False))
items = Table(
    "items",
    metadata,
    # AUTOINCREMENT: ids are never reused, so a vector file can never map an old id to a new item.
    Column("id", Int64, primary_key=True, autoincrement=True),
    Column("modality", String, nullable=False),  # "image" | "text"
    Column("path", LargeBinary),  # image: the file path, bytes exactly as the OS gave them
    Column("display", String),  # image: the path as text, undecodable bytes replaced
    Column("caption", String),  # text
    Column("collection", String),  # text: its caption collection
    Column("ref", String),  # text: the id column of its caption file
    Column("image_ref", String),  # text: the image-path column of its caption file
    Column("size", Int64),
    Column("mtime_ns", Int64),
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
    Column("item_id", Int64, ForeignKey("items.id"), primary_key=True),
    Column("vector", LargeBinary, nullable=False),  # float32, little-endian
)
failures = Table(
    "failures",
    metadata,
    Column("path", LargeBinary, primary_key=True),
    Column("display", String, nullable=False),
    Column("reason", String, nullable=False),
    Column("size", Int64),
    Column("mtime_ns", Int64),
    Column("at", Float, nullable=False),
)
# The unique keys that keep concurrent writers from storing an item twice (both databases have
# partial indexes); writers on PostgreSQL insert against them with ON CONFLICT DO NOTHING.
IMAGE_KEY = ("path",)
TEXT_KEY = ("collection", "caption")
_INDEXES = (
    "CREATE UNIQUE INDEX IF NOT EXISTS image_path ON items (path) WHERE modality = 'image'",
    "CREATE UNIQUE INDEX IF NOT EXISTS text_caption ON items (collection, caption) WHERE modality = 'text'",
    "CREATE INDEX IF NOT EXISTS item_hash ON items (sha256)",
)
_MIGRATION_LOCK = 0x636C6970  # PostgreSQL advisory lock: one process creates the schema, the others wait


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


def display_path(path: bytes) -> str:
    return path.decode("utf-8", "replace")


# -- connecting ------------------------------------------------------------------------------


def connect(where: Path | str, safe_name: str, readonly: bool) -> Engine:
    """An engine on an SQLite file (a Path) or a PostgreSQL URL (a str); `safe_name` names it in
    errors without a password."""
    if isinstance(where, Path):
        url = f"sqlite:///file:{where}?mode=ro&uri=true" if readonly else f"sqlite:///{where}"
        engine = create_engine(url)
        event.listen(engine, "connect", _on_sqlite_connect)
        return engine
    url = re.sub(r"^(postgresql|postgres)(\+\w+)?://", "postgresql+psycopg://", where)
    # A reader's transactions are read-only on the server too: a bug cannot write through one.
    options = {"options": "-c default_transaction_read_only=on"} if readonly else {}
    try:
        engine = create_engine(url, connect_args={"connect_timeout": 10, **options}, pool_pre_ping=True)
    except (ModuleNotFoundError, NoSuchModuleError):
        raise StoreError(
            f"the catalog at {safe_name} is in PostgreSQL, which needs psycopg: pip install 'clipseek[postgres]'"
        ) from None
    try:
        with engine.connect():
            pass
    except DBAPIError as error:
        engine.dispose()
        reason = str(error.orig).strip().splitlines()[0] if error.orig else type(error).__name__
        raise StoreError(f"cannot reach the catalog at {safe_name}: {reason}") from None
    return engine


def _on_sqlite_connect(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA busy_timeout = 10000")
    cursor.execute("PRAGMA synchronous = NORMAL")  # with WAL: a crash loses no committed batch
    cursor.close()


def is_postgresql(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def migrate(engine: Engine, name: str) -> None:
    """Create the schema of a new catalog; refuse one written by a newer clipseek."""
    if is_postgresql(engine):
        with engine.begin() as connection:
            connection.execute(select(text(f"pg_advisory_xact_lock({_MIGRATION_LOCK})")))
            metadata.create_all(connection)
            version = int(connection.execute(select(meta.c.value).where(meta.c.key == "schema")).scalar() or 0)
            if version > SCHEMA_VERSION:
                raise StoreError(f"{name} was written by a newer clipseek (schema {version}); upgrade clipseek")
            if version < 1:
                for statement in _INDEXES:
                    connection.exec_driver_sql(statement)
                connection.execute(insert(meta), [{"key": "generation", "value": "0"}, {"key": "schema", "value": "1"}])
        return
    with engine.begin() as connection:
        # 16 KiB pages hold seven 512-d float32 embeddings (88% full); SQLite's default 4 KiB pages
        # hold one, half empty. It only takes effect on a new file, before WAL mode is set.
        connection.exec_driver_sql("PRAGMA page_size = 16384")
        connection.exec_driver_sql("PRAGMA journal_mode = WAL")
        version = connection.exec_driver_sql("PRAGMA user_version").scalar()
        if version > SCHEMA_VERSION:
            raise StoreError(f"{name} was written by a newer clipseek (schema {version}); upgrade clipseek")
        if version < 1:
            metadata.create_all(connection)
            for statement in _INDEXES:
                connection.exec_driver_sql(statement)
            connection.execute(insert(meta).values(key="generation", value="0"))
            connection.exec_driver_sql(f"PRAGMA user_version = {SCHEMA_VERSION}")


def check_exists(engine: Engine, name: str) -> None:
    """A reader of a PostgreSQL database that holds no catalog yet: the error an absent SQLite file gives."""
    with engine.connect() as connection:
        if connection.exec_driver_sql("SELECT to_regclass('meta')").scalar() is None:
            raise IndexNotFoundError(f"no index in {name}: create one with `clipseek index FOLDER --index {name}`")


# -- what the two databases spell differently -------------------------------------------------


def upsert(engine: Engine, table: Table, key: str) -> object:
    """INSERT into `table` that replaces the row with the same `key` (its primary key)."""
    if is_postgresql(engine):
        from sqlalchemy.dialects.postgresql import insert as dialect_insert  # 0.03 s to import: PostgreSQL's only
    else:
        dialect_insert = sqlite_insert
    statement = dialect_insert(table)
    updated = {column.name: statement.excluded[column.name] for column in table.columns if column.name != key}
    return statement.on_conflict_do_update(index_elements=[key], set_=updated)


def insert_new(table: Table, modality: str) -> object:
    """PostgreSQL's INSERT of items that skips those another writer stored first (by their unique
    key) and returns the ids and keys of those it stored."""
    keys = IMAGE_KEY if modality == "image" else TEXT_KEY
    # The partial index's predicate as a literal: PostgreSQL matches the arbiter index by its
    # text, and a bound parameter fails to once psycopg prepares the statement (its sixth run).
    where = text({"image": "modality = 'image'", "text": "modality = 'text'"}[modality])
    from sqlalchemy.dialects.postgresql import insert as postgresql_insert

    return (
        postgresql_insert(table)
        .on_conflict_do_nothing(index_elements=list(keys), index_where=where)
        .returning(table.c.id, *(table.c[key] for key in keys))
    )


def glob_match(engine: Engine, column, pattern: str):
    """`column` matches a shell glob (* ? [...], case-sensitive, * across slashes): SQLite's GLOB,
    or the same pattern as a POSIX regular expression on PostgreSQL."""
    if not is_postgresql(engine):
        return column.op("GLOB")(pattern)
    regex, at = [], 0
    while at < len(pattern):
        character = pattern[at]
        closing = pattern.find("]", at + 2) if character == "[" else -1
        if character == "*":
            regex.append(".*")
        elif character == "?":
            regex.append(".")
        elif closing > 0:
            inside = pattern[at + 1 : closing]
            inside = "^" + inside[1:] if inside.startswith(("^", "!")) else inside
            regex.append("[" + inside.replace("\\", "\\\\") + "]")
            at = closing
        else:
            regex.append(re.escape(character))
        at += 1
    return column.regexp_match("^" + "".join(regex) + "$")


def is_conflict(error: DBAPIError) -> bool:
    """A deadlock or serialization failure between concurrent writers (PostgreSQL's SQLSTATE 40xxx)."""
    return str(getattr(error.orig, "sqlstate", "") or "").startswith("40")
