"""The memory-mapped embeddings: a copy of one modality's catalog embeddings beside its vector file,
from which an approximate index's candidates are re-ranked without random reads from the catalog.

    image.embeddings         vectors (count × dim, float16 or float32), their CRC-32s, their ids (sorted)
    image.embeddings.stamp   generation, count, dim, dtype, size and the build's nonce

Like the vector files it is derived data: written to a temporary file, fsynced, renamed, then
stamped. Checksumming a multi-GB file on every open would cost seconds, so each row carries its
own CRC-32, seeded by the item id asked for and the build's nonce, and a row is verified every
time it is read (1,000 rows: about 0.5 ms). A file is only opened when its size is the stamped
one; a damaged row, a row of another item (damaged ids) or of another build (a crash between the
rename and the stamp) fails its check, and the file is then dropped, never served. Writers check
the whole file against its stamped CRC-32 at the end of each writing command, as they check the
vector files, and so does `clipseek check`.

An item id's embedding never changes: a picture whose content changed is removed and added again
under a new id, and ids are never reused (catalog.items, AUTOINCREMENT). So a file stays right for
every id it holds; items added since it was built are re-ranked from the catalog, and removed
ones are never candidates (candidates come from the vector index or the catalog). A float32
file holds the catalog's very floats, so its scores are the catalog's, bit for bit; from a
float16 file the hits that may be among the best are re-scored from the catalog's float32
embeddings (see rerank), so answers are the same as re-ranking from the catalog, and an item
removed since the reader's vector index was loaded is dropped there too.
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from indexer.store.vectors import (
    checksum,
    fsync,
    inner_products,
    read_stamp,
    stamp_path,
    widened,
    write_atomically,
)

__all__ = ["DamagedError", "EmbeddingFile", "choose_dtype", "rerank", "write"]

Embeddings = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # ids → (ids found, float32 vectors)

FLOAT16_UNIT = 2.0**-11  # float16's relative rounding error
FLOAT16_TINY = 2.0**-25  # its absolute error below the normal range
FLOAT32_UNIT = 2.0**-24  # float32's, which bounds a dim-term sum's error at dim × this × |q||v|
SEED_STEP = 0x9E3779B1  # odd: ids below 2**32 get distinct CRC seeds
PREFAULT_BLOCK = 64 << 20  # bytes touched per call (EmbeddingFile.prefault)
GUESSES = 3  # steps from an id's row by the ids' spacing before a binary search (EmbeddingFile.find)


class DamagedError(Exception):
    """A row read from the file failed its check."""


@dataclass(frozen=True)
class Stamp:
    generation: int  # the catalog generation the file reflects
    count: int
    dim: int
    dtype: str  # "float16" | "float32"
    size: int
    nonce: int  # this build's: seeds every row's CRC
    checksum: int  # CRC-32 of the whole file, for full checks (faster than row by row)

    def row_bytes(self) -> int:
        return self.dim * np.dtype(self.dtype).itemsize


def choose_dtype(count: int, dim: int, index_bytes: int, budget: int) -> str:
    """float32 (scores exact) when it fits in the memory budget beside the vector index, else
    float16 (half the memory; the final hits are re-scored in float32)."""
    return "float32" if index_bytes + count * 4 * dim <= budget else "float16"


def _seeds(ids: np.ndarray, nonce: int) -> list[int]:
    """Each row's CRC seed, from its id and the build's nonce (in numpy: 1,000 ids in microseconds)."""
    return ((np.asarray(ids).astype(np.uint64) * SEED_STEP + nonce) & 0xFFFFFFFF).tolist()


def write(path: Path, blocks: Iterable[tuple[np.ndarray, np.ndarray]], dim: int, dtype: str, generation: int) -> Stamp:
    """Write the (ids, vectors) blocks, ordered by id, atomically: vectors stream to a temporary
    file, their CRCs and ids follow, it is fsynced and renamed, then stamped. A crash before
    the stamp leaves a file its stamp disagrees with (size or nonce): rebuilt, never served."""
    nonce = secrets.randbits(32)
    temporary = path.with_name(path.name + ".tmp")
    all_ids, crcs = [], []
    with open(temporary, "wb") as out:
        for ids, vectors in blocks:
            rows = np.ascontiguousarray(vectors, dtype=np.dtype(dtype).newbyteorder("<"))
            out.write(rows.tobytes())
            crcs.append(np.fromiter(map(zlib.crc32, rows, _seeds(ids, nonce)), np.uint32, len(ids)))
            all_ids.append(np.asarray(ids, np.int64))
        ids = np.concatenate([np.zeros(0, np.int64), *all_ids])
        out.write(np.concatenate([np.zeros(0, np.uint32), *crcs]).astype("<u4").tobytes())
        out.write(ids.astype("<i8").tobytes())
        out.flush()
        os.fsync(out.fileno())
    crc = checksum(temporary)  # read back from the page cache it was just written to
    os.replace(temporary, path)
    stamp = Stamp(generation, len(ids), dim, dtype, path.stat().st_size, nonce, crc)
    write_atomically(stamp_path(path), json.dumps(asdict(stamp)).encode())
    fsync(path.parent)
    return stamp


class EmbeddingFile:
    """An open, stamped embeddings file: rows found by id, verified as they are read."""

    def __init__(self, path: Path, stamp: Stamp):
        self.path, self.stamp = path, stamp
        self.inode = path.stat().st_ino
        count, row = stamp.count, stamp.row_bytes()
        # A plain array over the mapping: numpy's memmap subclass costs microseconds per indexing.
        data = np.asarray(np.memmap(path, np.uint8, "r")) if stamp.size else np.zeros(0, np.uint8)
        if len(data) != stamp.size:  # replaced since its size was read (a writer's rebuild)
            raise DamagedError(f"replaced while opened ({len(data)} bytes, stamped {stamp.size})")
        self._data = data
        self.vectors = data[: count * row].view(np.dtype(stamp.dtype).newbyteorder("<")).reshape(count, stamp.dim)
        self.crcs = data[count * row : count * (row + 4)].view("<u4")
        self.ids = data[count * (row + 4) :].view("<i8")

    @classmethod
    def open(cls, path: Path, dim: int, generation: int) -> tuple[EmbeddingFile | None, str]:
        """The file if its stamp agrees with it (size, dim, not newer than the catalog) and its
        first and last rows verify; else None and why not. Reads no more than those rows."""
        stamp, size, why = read_stamp(path, Stamp)
        if stamp is None:
            return None, why
        if stamp.dim != dim or stamp.dtype not in ("float16", "float32"):
            return None, f"made for {stamp.dim}-d {stamp.dtype} vectors"
        if size != stamp.size or size != stamp.count * (stamp.row_bytes() + 12):
            return None, f"truncated or overwritten ({size} bytes, stamped {stamp.size})"
        if stamp.generation > generation:
            return None, f"newer than the catalog (generation {stamp.generation}, the catalog's {generation})"
        try:
            opened = cls(path, stamp)
            opened.rows(np.unique([0, max(stamp.count - 1, 0)])[: stamp.count])
        except DamagedError as error:
            return None, str(error)
        except FileNotFoundError:  # removed since its size was read (`check --repair` starts so)
            return None, "missing"
        return opened, ""

    def describe(self) -> str:
        return f"{self.stamp.dtype}, {self.stamp.size / 2**20:,.0f} MiB mapped"

    def unchanged(self) -> bool:
        """Whether the file on disk is still the one mapped (not rebuilt or removed since)."""
        stamp, _, _ = read_stamp(self.path, Stamp)
        try:
            return stamp == self.stamp and self.path.stat().st_ino == self.inode
        except FileNotFoundError:
            return False

    def prefault(self) -> None:
        """Touch every page of the file, in order: read from the disk (with read-ahead) where the
        page cache lacks it, and mapped into this process, so that queries fault on none. A
        fresh process at 10 million rows faulted some 800 pages in per query, 3 of its 8 ms.
        The interpreter is let go while numpy touches each block."""
        for start in range(0, len(self._data), PREFAULT_BLOCK):
            self._data[start : start + PREFAULT_BLOCK : mmap.PAGESIZE].max()

    def find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows of the ids this file holds, mask of those ids among `ids`)."""
        if not self.stamp.count:
            return np.zeros(0, np.int64), np.zeros(len(ids), bool)
        # Ids are handed out in order and rarely removed, so an id's row is nearly where the ids'
        # average spacing puts it (a modality alone, or interleaved with the other): a few reads
        # each, where a binary search over the 80 MB of ids of 10 million rows reads some 20
        # (a millisecond per 1,000 candidates). What the guesses miss is searched for.
        ids, last = np.asarray(ids, np.int64), self.stamp.count - 1
        first = int(self.ids[0])
        spacing = max((int(self.ids[last]) - first) / max(last, 1), 1.0)
        rows = np.clip(np.rint((ids - first) / spacing).astype(np.int64), 0, last)
        for _ in range(GUESSES):
            off = ids - self.ids[rows]
            if not off.any():
                break
            rows = np.clip(rows + np.rint(off / spacing).astype(np.int64), 0, last)
        missed = self.ids[rows] != ids
        rows[missed] = np.minimum(np.searchsorted(self.ids, ids[missed]), last)
        held = self.ids[rows] == ids
        return rows[held], held

    def rows(self, rows: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """The vectors of `rows` as float32, each checked against its CRC for the id asked for
        (`ids`, else the id stored in the row): a damaged row raises DamagedError."""
        vectors = np.asarray(self.vectors[rows])
        asked = self.ids[rows] if ids is None else ids
        found = np.fromiter(map(zlib.crc32, vectors, _seeds(asked, self.stamp.nonce)), np.uint32, len(rows))
        bad = np.flatnonzero(found != self.crcs[rows])
        if len(bad):
            raise DamagedError(f"damaged (the row of item {int(asked[bad[0]])} fails its checksum)")
        return widened(vectors) if self.stamp.dtype == "float16" else vectors.astype(np.float32)

    def verify_all(self) -> str:
        """The whole file against its stamped CRC-32 (at zlib's speed, where row by row runs
        several times slower), and the ids in order: writers and `clipseek check`. Empty when sound."""
        found = checksum(self.path)
        if found != self.stamp.checksum:
            return f"damaged (its content's checksum is {found:08x}, stamped {self.stamp.checksum:08x})"
        if np.any(np.diff(self.ids) <= 0):
            return "damaged (its ids are out of order)"
        return ""

    def error_bound(self, query: np.ndarray) -> float:
        """How far a score from this file's vectors may be from the float32 one (Cauchy–Schwarz on
        the rounding of unit vectors), plus float32's own summation slack."""
        if self.stamp.dtype == "float32":
            return 0.0  # the catalog's floats, summed as the catalog path sums them
        # |q·(v − v16)| ≤ |q||v − v16|, each component rounded within FLOAT16_UNIT of itself (or
        # FLOAT16_TINY below float16's normal range); both sums' float32 error besides.
        rounding = FLOAT16_UNIT * 1.01 + np.sqrt(self.stamp.dim) * FLOAT16_TINY
        return float(np.linalg.norm(query)) * (rounding + 2 * self.stamp.dim * FLOAT32_UNIT)


def rerank(
    query: np.ndarray, ids: np.ndarray, k: int, mapped: EmbeddingFile, embeddings: Embeddings
) -> tuple[np.ndarray, np.ndarray]:
    """The k of `ids` nearest to `query` by the cosine of their catalog embeddings: (ids, scores), best first.

    Candidates held by the file are scored from it, the rest from the catalog. Each file score
    lies within the file's error bound of its float32 score (0 for a float32 file), so an item
    whose score plus the bound is below the k-th best score minus the bound cannot be among the
    k best; those that may be are re-scored from the catalog (about k of them, for float16),
    which gives true float32 cosines and drops any item removed meanwhile. Raises DamagedError
    when a row read fails its check.
    """
    ids = np.asarray(ids, np.int64)
    rows, held = mapped.find(ids)
    bound = mapped.error_bound(query)
    scores = np.empty(len(ids), np.float32)
    slack = np.where(held, bound, 0.0)
    scores[held] = inner_products(mapped.rows(rows, ids[held]), query)
    if not held.all():
        known, vectors = embeddings(ids[~held])
        present = np.isin(ids, known) | held
        scores[np.isin(ids, known)] = inner_products(vectors, query) if len(known) else 0
        ids, scores, slack = ids[present], scores[present], slack[present]
    exact = slack == 0
    while len(ids):
        kth = np.sort(scores - slack)[::-1][min(k, len(ids)) - 1]
        unsure = (scores + slack >= kth) & ~exact
        if not unsure.any():
            break
        known, vectors = embeddings(ids[unsure])
        present = ~unsure | np.isin(ids, known)
        scores[unsure & present] = inner_products(vectors, query) if len(known) else 0
        exact |= unsure
        slack[unsure] = 0.0
        ids, scores, slack, exact = ids[present], scores[present], slack[present], exact[present]
    order = np.argsort(-scores, kind="stable")[:k]
    return ids[order], scores[order]
