"""Embedding shards: Parquet files of pictures embedded elsewhere (on Ray), and their ingestion.

A shard row is one picture: its source (a file path, a URL, or `SHARD#KEY` for a WebDataset
sample, as bytes), size, mtime_ns, sha256, width, height, taken_at, and either its embedding
(`vector`, float32 little-endian bytes) or why it failed (`failure`, empty when it did not);
pictures from a list also carry their `caption`, its `caption_vector` and the `collection` it
joins (an image→text collection, each caption pointing at its picture).

Shards wait in the index folder's `shards/` until they are ingested; each is ingested in one
transaction and then deleted, so a killed ingest resumes with the shards left, and a shard
ingested just before the kill is found already in the catalog (same source, size and time, or
the same failure) and skipped: never a duplicate.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexer.sources.pictures import VANISHED
from indexer.store import NewCaption, NewImage, Store

log = logging.getLogger("clipseek")


def shard_dir(store: Store) -> Path:
    return store.root / "shards"


@dataclass
class Ingested:
    added: int = 0
    failed: int = 0
    captions: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def ingest(store: Store, progress: Callable[[int, int], None] | None = None) -> Ingested:
    """Move every shard waiting in the index folder into the catalog, oldest first;
    `progress(pictures done, pictures in all)` after each.

    Only the catalog changes (a bulk load): the caller runs `store.fit()` afterwards to build
    the vector files. A shard that cannot be read (cut short by a kill while it was written) is
    dropped with a warning: its pictures are not in the catalog, so the next run embeds them again.
    """
    folder = shard_dir(store)
    shards = sorted(folder.glob("*.parquet"), key=lambda path: (path.stat().st_mtime_ns, path.name))
    done = Ingested()
    if not shards:
        return done
    stored, failed_before = store.catalog.images(), store.catalog.failures()
    captions: dict[str, set[str]] = {}  # per collection: those it holds
    total, done_rows = sum(_rows(shard) for shard in shards), 0
    for shard in shards:
        try:
            table = pq.read_table(shard)
        except (OSError, pa.ArrowException) as error:
            log.warning("dropping the unreadable shard %s (%s); its pictures are embedded again next run", shard, error)
            shard.unlink()
            continue
        with store.write(index_vectors=False) as writer:
            fresh = []
            for row in table.to_pylist():
                old = stored.get(row["path"])
                seen = (row["size"], row["mtime_ns"])
                already = (old is not None and (old.size, old.mtime_ns) == seen) or failed_before.get(
                    row["path"]
                ) == seen
                if already or row["failure"] == VANISHED:  # VANISHED: deleted while the run looked at it
                    continue
                elif row["failure"]:
                    writer.record_failure(row["path"], row["failure"], row["size"], row["mtime_ns"])
                    done.failed += 1
                    done.failures.append((os.fsdecode(row["path"]), row["failure"]))
                else:
                    if old is not None:  # a changed picture: its old item goes
                        writer.delete_items([old.id])
                    fresh.append(_image(row))
            # None: stored first by another writer on the same PostgreSQL catalog
            done.added += sum(item is not None for item in writer.add_images(fresh))
            for collection, new in _captions(table, store, captions).items():
                done.captions += sum(item is not None for item in writer.add_captions(collection, new))
        shard.unlink()
        done_rows += table.num_rows
        if progress:
            progress(done_rows, total)
    return done


def _rows(shard: Path) -> int:
    try:
        return pq.ParquetFile(shard).metadata.num_rows
    except (OSError, pa.ArrowException):
        return 0  # unreadable: dropped by ingest


def _image(row: dict) -> NewImage:
    vector = np.frombuffer(row["vector"], dtype="<f4")
    taken_at = row["taken_at"] or None  # a listed picture without EXIF has no date
    return NewImage(
        row["path"], row["size"], row["mtime_ns"], row["sha256"], row["width"], row["height"], taken_at, vector
    )


def _captions(table: pa.Table, store: Store, known: dict[str, set[str]]) -> dict[str, list[NewCaption]]:
    """The new captions of a shard's pictures, by collection; a caption a collection has is not added again."""
    if "caption_vector" not in table.column_names:
        return {}
    new: dict[str, list[NewCaption]] = {}
    for row in table.select(["path", "caption", "caption_vector", "collection"]).to_pylist():
        if not row["caption_vector"]:
            continue
        held = known.setdefault(row["collection"], store.catalog.captions(row["collection"]))
        if row["caption"] in held:
            continue
        held.add(row["caption"])
        vector = np.frombuffer(row["caption_vector"], dtype="<f4")
        new.setdefault(row["collection"], []).append(
            NewCaption(row["caption"], None, row["path"].decode("utf-8", "replace"), vector)
        )
    return new
