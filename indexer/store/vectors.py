"""The vector files: one FAISS index per modality, derived from the catalog (the only faiss importer).

A vector file is written to a temporary file, fsynced and renamed into place, then stamped by a
small JSON file beside it (`image.faiss.stamp`) with the catalog generation it reflects, its
byte size and its vector count. A file whose stamp is missing or disagrees is never served: the
store rebuilds it from the catalog.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np


@dataclass(frozen=True)
class Stamp:
    generation: int
    count: int
    size: int


class VectorIndex:
    """Exact inner-product search over L2-normalised vectors (cosine similarity), keyed by item id."""

    kind = "flat"

    def __init__(self, index: faiss.Index):
        self.index = index

    @classmethod
    def build(cls, dim: int, ids: np.ndarray | None = None, vectors: np.ndarray | None = None) -> VectorIndex:
        built = cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))
        if ids is not None and len(ids):
            built.add(ids, vectors)
        return built

    @property
    def count(self) -> int:
        return self.index.ntotal

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))

    def remove(self, ids: list[int]) -> None:
        if ids:
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (queries, min(k, candidates)), best first; ids only from `allowed`."""
        k = min(k, self.count if allowed is None else len(allowed))
        if k == 0:
            empty = np.zeros((len(queries), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        params = None if allowed is None else faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)

    def save(self, path: Path, generation: int) -> None:
        """Write atomically, then stamp: a crash in between leaves a file whose stamp disagrees."""
        temporary = path.with_name(path.name + ".tmp")
        faiss.write_index(self.index, str(temporary))
        _fsync(temporary)
        os.replace(temporary, path)
        stamp = Stamp(generation, self.count, path.stat().st_size)
        _write_atomically(_stamp_path(path), json.dumps(stamp.__dict__).encode())
        _fsync(path.parent)

    @classmethod
    def load(cls, path: Path, changed: int, generation: int) -> tuple[VectorIndex | None, str]:
        """The index in `path` if it is fresh; else None and why not.

        Fresh: stamped at or after `changed` (the last generation that changed this modality's
        vectors) and not after `generation` (the catalog's; a later stamp means the catalog was
        replaced, say by a restored backup).
        """
        try:
            stamp = Stamp(**json.loads(_stamp_path(path).read_bytes()))
        except FileNotFoundError:
            return None, "missing" if not path.exists() else "not stamped"
        except (ValueError, TypeError):
            return None, "its stamp is unreadable"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None, "missing"
        if size != stamp.size:
            return None, f"truncated or overwritten ({size} bytes, stamped {stamp.size})"
        if not changed <= stamp.generation <= generation:
            return None, f"stale (reflects generation {stamp.generation}; its items changed at {changed})"
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:
            return None, f"unreadable ({str(error).splitlines()[0]})"
        if index.ntotal != stamp.count:
            return None, f"holds {index.ntotal} vectors, stamped {stamp.count}"
        return cls(index), ""


def remove_files(path: Path) -> None:
    for stale in (path, _stamp_path(path)):
        stale.unlink(missing_ok=True)


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".stamp")


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
