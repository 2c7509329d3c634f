"""Writing to an index: the one-writer lock (SQLite), the lock that lets one process at a time
save a machine's vector files, and the changes of one transaction, applied to the catalog at once
and mirrored into the in-memory vector indexes when it commits (Store.write)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from indexer.errors import IndexLockedError
from indexer.store.catalog import MODALITIES, NewCaption, NewImage, Writer
from indexer.store.vectors import VectorIndex

__all__ = ["StoreWriter", "hold_local_lock", "take_writer_lock"]


class StoreWriter:
    """The changes of one Store.write() transaction, mirrored into the vector indexes on commit."""

    def __init__(self, writer: Writer, vector_index: Callable[[str], VectorIndex] | None):
        self._writer = writer
        # A modality's vector index is loaded (or rebuilt from the catalog, which does not yet
        # see this transaction) before its first change, so the change is applied exactly once.
        # None: a bulk load, which leaves the vector files to be rebuilt.
        self._load_vectors = vector_index or (lambda modality: None)
        self._bulk = vector_index is None
        self.added: dict[str, tuple[list[int], list[np.ndarray]]] = {}
        self.removed: list[int] = []

    def _added(self, modality: str, ids: list[int | None], vectors: list[np.ndarray]) -> list[int | None]:
        """Mirrors what was stored (None: an item another writer had stored first)."""
        if not ids or self._bulk:
            return ids
        known_ids, known_vectors = self.added.setdefault(modality, ([], []))
        for item_id, vector in zip(ids, vectors, strict=True):
            if item_id is not None:
                known_ids.append(item_id)
                known_vectors.append(vector)
        return ids

    def add_images(self, images: list[NewImage]) -> list[int | None]:
        if images:
            self._load_vectors("image")
        return self._added("image", self._writer.add_images(images), [image.vector for image in images])

    def add_captions(self, collection: str, captions: list[NewCaption]) -> list[int | None]:
        if captions:
            self._load_vectors("text")
        return self._added("text", self._writer.add_captions(collection, captions), [c.vector for c in captions])

    def delete_items(self, ids: list[int]) -> None:
        if ids:
            for modality in MODALITIES:
                self._load_vectors(modality)
        self._writer.delete_items(ids)
        self.removed.extend(ids)

    def delete_collection(self, collection: str) -> int:
        ids = self._writer.collection_ids(collection)
        self.delete_items(ids)
        return len(ids)

    def move_image(self, item_id: int, path: bytes, size: int, mtime_ns: int) -> None:
        self._writer.move_image(item_id, path, size, mtime_ns)

    def touch_image(self, item_id: int, size: int, mtime_ns: int) -> None:
        self._writer.touch_image(item_id, size, mtime_ns)

    def record_failure(self, path: bytes, reason: str, size: int | None, mtime_ns: int | None) -> None:
        self._writer.record_failure(path, reason, size, mtime_ns)

    def forget_failures(self, paths: list[bytes]) -> None:
        self._writer.forget_failures(paths)

    def record_device(self, runs_on: str) -> None:
        """Where the pictures of this transaction were embedded ("cuda:0 (torch, float16)"), for status."""
        self._writer.set("embedded_on", runs_on)


def take_writer_lock(root: Path) -> int:
    """flock on writer.lock: one writer at a time, released by the OS even on kill -9."""
    descriptor = os.open(root / "writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(descriptor)
        raise IndexLockedError(
            f"the index at {root} is being written by process {holder}; wait for it to finish"
        ) from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, str(os.getpid()).encode(), 0)
    return descriptor


@contextmanager
def hold_local_lock(root: Path) -> Iterator[None]:
    """flock on vectors.lock while saving vector files: with the catalog on PostgreSQL, several
    writers on one machine share its folder of vector files."""
    descriptor = os.open(root / "vectors.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)
