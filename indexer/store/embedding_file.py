"""The memory-mapped embeddings: a copy of one modality's catalog embeddings beside its vector file,
from which an approximate index's candidates are re-ranked without random reads from the catalog.

    image.embeddings         records (count × each vector, float16 or float32, and its check), then the ids (sorted)
    image.embeddings.stamp   generation, count, dim, dtype, size and the build's nonce

Like the vector files it is derived data: written to a temporary file, fsynced, renamed, then
stamped. Checksumming a multi-GB file on every open would cost seconds, so each row carries a check
of its own, right after its vector (one read brings both), verified every time the row is read: a
64-bit multilinear hash of its bytes (sum of each 8-byte word times a key, modulo 2**64) plus a
term of the item id asked for, its keys drawn from the build's nonce (see row_checks). numpy
computes it for 1,000 rows at once in 0.1-0.2 ms, where zlib's CRC-32 called row by row takes 0.5
ms (of a 5 ms query at 10 million items). A file is only opened when its size is the stamped one; a
damaged row, a row of another item (damaged ids) or of another build (a crash between the rename
and the stamp) fails its check, and the file is then dropped, never served. Writers check the whole
file against its stamped CRC-32 at the end of each writing command, as they check the vector files,
and so does `clipseek check`.

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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from indexer.store.vectors import (
    checksum,
    fsync,
    half_inner_products,
    inner_products,
    read_stamp,
    stamp_path,
    write_atomically,
)

__all__ = ["DamagedError", "EmbeddingFile", "choose_dtype", "rerank", "write"]

Embeddings = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # ids → (ids found, float32 vectors)

FLOAT16_UNIT = 2.0**-11  # float16's relative rounding error
FLOAT16_TINY = 2.0**-25  # its absolute error below the normal range
FLOAT32_UNIT = 2.0**-24  # float32's, which bounds a dim-term sum's error at dim × this × |q||v|
ROW_CHECK = "multilinear64"  # the stamp's name for row_checks (a file of another is rebuilt)
GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's step (row_keys)
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
    nonce: int  # this build's: seeds the keys of every row's check
    checksum: int  # CRC-32 of the whole file, for full checks (faster than row by row)
    row_check: str = "crc32"  # how each row is checked: files without the field had CRC-32s

    def row_bytes(self) -> int:
        return self.dim * np.dtype(self.dtype).itemsize


def choose_dtype(count: int, dim: int, index_bytes: int, budget: int) -> str:
    """float32 (scores exact) when it fits in the memory budget beside the vector index, else
    float16 (half the memory; the final hits are re-scored in float32)."""
    return "float32" if index_bytes + count * 4 * dim <= budget else "float16"


def row_keys(nonce: int, words: int) -> np.ndarray:
    """The keys of a build's row checks: `words` + 2 odd 64-bit numbers from splitmix64 seeded by
    its nonce (plain uint64 arithmetic, so every numpy version draws the same ones)."""
    with np.errstate(over="ignore"):
        z = np.uint64(nonce) + np.arange(1, words + 3, dtype=np.uint64) * np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) | np.uint64(1)


def row_checks(rows: np.ndarray, ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Each row's check: Σ word·key over its little-endian 64-bit words, + id·key + key, mod 2**64.

    The keys are odd, so a change confined to one word always changes the check, and so does
    the row of another id; a row of another build (other keys) or random garbage passes with
    a chance of about 2**-64. Rows whose byte length is no multiple of 8 have their last bytes
    taken one by one."""
    data = np.asarray(rows).view(np.uint8).reshape(len(rows), -1)  # rows: each contiguous
    whole = data.shape[1] // 8 * 8
    words = data[:, :whole].view("<u8")
    if whole < data.shape[1]:
        words = np.concatenate([words, data[:, whole:].astype(np.uint64)], axis=1)
    with np.errstate(over="ignore"):
        return (
            (words * keys[: words.shape[1]]).sum(1, dtype=np.uint64)
            + np.asarray(ids).astype(np.uint64) * keys[-2]
            + keys[-1]
        )


def _words(row_bytes: int) -> int:
    return row_bytes // 8 + row_bytes % 8


def write(path: Path, blocks: Iterable[tuple[np.ndarray, np.ndarray]], dim: int, dtype: str, generation: int) -> Stamp:
    """Write the (ids, vectors) blocks, ordered by id, atomically: vectors stream to a temporary
    file, their checks and ids follow, it is fsynced and renamed, then stamped. A crash before
    the stamp leaves a file its stamp disagrees with (size or nonce): rebuilt, never served."""
    nonce = secrets.randbits(32)
    keys = row_keys(nonce, _words(dim * np.dtype(dtype).itemsize))
    temporary = path.with_name(path.name + ".tmp")
    all_ids = []
    with open(temporary, "wb") as out:
        for ids, vectors in blocks:
            rows = np.ascontiguousarray(vectors, dtype=np.dtype(dtype).newbyteorder("<")).view(np.uint8)
            checks = row_checks(rows, ids, keys).astype("<u8").view(np.uint8).reshape(len(rows), 8)
            out.write(np.concatenate([rows.reshape(len(checks), -1), checks], axis=1).tobytes())
            all_ids.append(np.asarray(ids, np.int64))
        ids = np.concatenate([np.zeros(0, np.int64), *all_ids])
        out.write(ids.astype("<i8").tobytes())
        out.flush()
        os.fsync(out.fileno())
    crc = checksum(temporary)  # read back from the page cache it was just written to
    os.replace(temporary, path)
    stamp = Stamp(generation, len(ids), dim, dtype, path.stat().st_size, nonce, crc, ROW_CHECK)
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
        self._data, self._row = data, row
        self._records = data[: count * (row + 8)].reshape(count, row + 8)  # each vector, then its check
        self.ids = data[count * (row + 8) :].view("<i8")
        self._keys = row_keys(stamp.nonce, _words(row))

    @classmethod
    def open(cls, path: Path, dim: int, generation: int) -> tuple[EmbeddingFile | None, str]:
        """The file if its stamp agrees with it (size, dim, not newer than the catalog) and its
        first and last rows verify; else None and why not. Reads no more than those rows."""
        stamp, size, why = read_stamp(path, Stamp)
        if stamp is None:
            return None, why
        if stamp.dim != dim or stamp.dtype not in ("float16", "float32"):
            return None, f"made for {stamp.dim}-d {stamp.dtype} vectors"
        if stamp.row_check != ROW_CHECK:
            return None, f"of an older format (rows checked by {stamp.row_check})"
        if size != stamp.size or size != stamp.count * (stamp.row_bytes() + 16):
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
        """The vectors of `rows` as float32, each checked for the id asked for (`ids`, else the id
        stored in the row): a damaged row raises DamagedError."""
        return self._checked(rows, ids).astype(np.float32, copy=False)  # a float32 file's rows: as read

    def scores(self, rows: np.ndarray, ids: np.ndarray, query: np.ndarray) -> np.ndarray:
        """The inner products of `rows` (checked for `ids`, as rows() checks them) with `query`: a
        float32 file's as the catalog path sums them, a float16 one's without widening its rows."""
        if self.stamp.dtype == "float16":
            return half_inner_products(self._checked(rows, ids), query)
        return inner_products(self.rows(rows, ids), query)

    def _checked(self, rows: np.ndarray, ids: np.ndarray | None) -> np.ndarray:
        records = self._records[rows]
        vectors, checks = records[:, : self._row], records[:, self._row :].view("<u8")[:, 0]
        asked = self.ids[rows] if ids is None else ids
        bad = np.flatnonzero(row_checks(vectors, asked, self._keys) != checks)
        if len(bad):
            raise DamagedError(f"damaged (the row of item {int(asked[bad[0]])} fails its checksum)")
        return np.ascontiguousarray(vectors).view(np.dtype(self.stamp.dtype).newbyteorder("<"))

    def verify_all(self) -> str:
        """The whole file against its stamped CRC-32 (read once, at zlib's speed), and the ids in
        order: writers and `clipseek check`. Empty when sound."""
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
    scores[held] = mapped.scores(rows, ids[held], query)
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
