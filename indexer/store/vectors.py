"""The vector files: one FAISS index per modality, derived from the catalog (the only faiss importer).

A vector file is written to a temporary file, fsynced and renamed into place, then stamped by a
small JSON file beside it (`image.faiss.stamp`) with the catalog generation it reflects, its
byte size, the CRC-32 of its content, its vector count and its index spec. A file whose stamp is
missing or disagrees is never served: the store rebuilds it from the catalog. The checksum is
verified before FAISS parses the file, so bytes damaged on disk (same size, stamp intact) are
neither served nor handed to a parser that trusts them.

Kinds (IndexSpec.kind): `flat`, exact search, the quality reference; `hnsw`, a graph over the
full vectors; `ivf`, full vectors in nlist clusters of which nprobe are searched; `ivfpq`, the
same clusters holding product-quantised codes of `code_bytes` bytes instead of the vectors (from
GRAPH_QUANTIZER_NLIST clusters on, both find the nearest clusters through an HNSW graph over
their centroids). All use inner product on unit vectors (cosine similarity) and are keyed by
catalog item id.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

import faiss
import numpy as np

KINDS = ("flat", "hnsw", "ivf", "ivfpq")
S = TypeVar("S")
TRAINING_SAMPLE = 50  # vectors per IVF cluster used to train it (FAISS wants at least 39)
ADD_BLOCK = 100_000  # vectors added at a time: progress to report, and bounded float32 copies
EXACT_SAMPLE = 32_768  # vectors an exact-search timing scans (64 MiB at 512-d: past the caches already)
CHECKSUM_BLOCK = 1 << 20  # bytes read at a time to checksum a vector file: bounded memory, few calls
# IVF kinds with this many clusters or more find a query's nearest clusters through an HNSW graph
# over the centroids instead of scanning them all: at 8,192 clusters of 512-d the scan reads 16 MB
# a query (0.6 ms, and the caches emptied for what follows); the graph, 0.1-0.3 ms.
GRAPH_QUANTIZER_NLIST = 4096
QUANTIZER_LINKS = 32  # the graph's neighbours per centroid (M)
QUANTIZER_EF = 128  # its candidate list: at nprobe 16 of 8,192 clusters, the recall of a flat scan


@dataclass(frozen=True)
class IndexSpec:
    """How a vector file is built and searched."""

    kind: str = "flat"
    nlist: int | None = None  # ivf, ivfpq: clusters
    nprobe: int | None = None  # ivf, ivfpq: clusters searched per query
    links: int | None = None  # hnsw: neighbours per node (M)
    ef_search: int | None = None  # hnsw: candidate list while searching
    code_bytes: int | None = None  # ivfpq: bytes per vector
    shortlist: int | None = None  # approximate kinds: candidates re-ranked exactly for 10 hits
    recall: float | None = None  # recall@10 against exact search, measured when it was built
    target: float | None = None  # the recall@10 tuning aimed for

    @property
    def exact(self) -> bool:
        return self.kind == "flat"

    def bytes_per_vector(self, dim: int) -> int:
        """Memory per vector, roughly: what the memory budget is checked against."""
        if self.kind == "ivfpq":
            return (self.code_bytes or dim // 8) + 8
        return 4 * dim + 8 + (2 * 4 * (self.links or 32) if self.kind == "hnsw" else 0)

    def describe(self) -> str:
        settings = {
            "flat": "exact search",
            "hnsw": f"M {self.links}, efSearch {self.ef_search}",
            "ivf": f"nlist {self.nlist}, nprobe {self.nprobe}",
            "ivfpq": f"nlist {self.nlist}, nprobe {self.nprobe}, {self.code_bytes}-byte codes",
        }[self.kind]
        if not self.exact:
            settings += f", best {self.candidates(10)} re-ranked"
        measured = f"; recall@10 {self.recall:.3f} when built" if self.recall is not None else ""
        measured += f" (target {self.target:g})" if self.recall is not None and self.target else ""
        return f"{self.kind} ({settings}{measured})"

    def candidates(self, k: int) -> int:
        """How many candidates to fetch for k hits, to be re-ranked exactly: PQ's estimated scores
        need a wider net than the exact ones of the full-vector kinds."""
        if self.exact:
            return k
        shortlist = self.shortlist or (200 if self.kind == "ivfpq" else 40)
        return max(shortlist * k // 10, shortlist)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> IndexSpec:
        return cls(**data) if data else cls()


@dataclass(frozen=True)
class Stamp:
    generation: int
    count: int
    size: int
    spec: dict | None = None  # stamps written before index kinds existed are flat
    # CRC-32 of the file. Stamps written before checksums existed have none: such a file cannot
    # be told from one damaged since, so it is rebuilt from the catalog like a damaged one.
    checksum: int | None = None


class VectorIndex:
    """Inner-product search over L2-normalised vectors (cosine similarity), keyed by item id."""

    def __init__(self, index: faiss.Index, spec: IndexSpec, mapped: bool = False):
        self.index = index
        self.spec = spec
        self.mapped = mapped  # its vectors are the file's pages (see load): searched, never changed

    @classmethod
    def build(
        cls,
        dim: int,
        ids: np.ndarray | None = None,
        vectors: np.ndarray | None = None,
        spec: IndexSpec | None = None,
    ) -> VectorIndex:
        """A new index of `spec` (flat by default) holding `vectors`; IVF kinds are trained on a sample of them."""
        spec = spec or IndexSpec()
        built = cls.empty(dim, spec, None if spec.kind in ("flat", "hnsw") else _sample(vectors, training_size(spec)))
        for start in range(0, 0 if ids is None else len(ids), ADD_BLOCK):
            built.add(ids[start : start + ADD_BLOCK], vectors[start : start + ADD_BLOCK])
        return built

    @classmethod
    def empty(cls, dim: int, spec: IndexSpec, training: np.ndarray | None = None) -> VectorIndex:
        """An index of `spec` holding nothing yet; IVF kinds are trained on `training` (see training_size)."""
        if spec.kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        elif spec.kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(dim, spec.links, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = max(40, spec.links * 2)
            index = faiss.IndexIDMap2(hnsw)
        else:
            quantizer = faiss.IndexFlatIP(dim)
            if spec.kind == "ivf":
                index = faiss.IndexIVFFlat(quantizer, dim, spec.nlist, faiss.METRIC_INNER_PRODUCT)
            else:
                index = faiss.IndexIVFPQ(quantizer, dim, spec.nlist, spec.code_bytes, 8, faiss.METRIC_INNER_PRODUCT)
                # A small collection trains its 256 codes per sub-space on fewer than FAISS's advised
                # 39 points each: coarser codes (re-ranking makes up for them), not worth a warning.
                index.pq.cp.min_points_per_centroid = 1
            index.train(np.ascontiguousarray(training, dtype=np.float32))
            if spec.nlist >= GRAPH_QUANTIZER_NLIST:
                _find_clusters_by_graph(index)
        return cls(index, spec)

    def with_settings(self, **settings) -> VectorIndex:
        """The same index searched with other nprobe / efSearch (tuning and benchmarks)."""
        return VectorIndex(self.index, replace(self.spec, **settings), self.mapped)

    @property
    def count(self) -> int:
        return self.index.ntotal

    def ids(self) -> np.ndarray:
        if isinstance(self.index, faiss.IndexIDMap2):
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        lists = self.index.invlists
        return np.concatenate(
            [np.zeros(0, np.int64)]
            + [
                faiss.rev_swig_ptr(lists.get_ids(number), lists.list_size(number)).copy()
                for number in range(self.index.nlist)
                if lists.list_size(number)
            ]
        )

    def _changing(self) -> None:
        if self.mapped:  # FAISS would abort the process
            raise ValueError("a vector index mapped from its file is read-only")

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._changing()
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))

    def remove(self, ids: list[int]) -> None:
        if not ids:
            return
        self._changing()
        if self.spec.kind != "hnsw":
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))
            return
        # An HNSW graph cannot lose nodes: it is rebuilt from its own vectors, without them.
        keep = self.ids()
        vectors = self.index.index.reconstruct_n(0, self.count)
        mask = ~np.isin(keep, np.asarray(ids, dtype=np.int64))
        rebuilt = VectorIndex.build(vectors.shape[1], keep[mask], vectors[mask], self.spec)
        self.index = rebuilt.index

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (queries, min(k, candidates)), best first; ids only from `allowed`.

        Exact for `flat`; for the other kinds, approximate: ids may be missing (-1) or not the
        true nearest, and `ivfpq` scores are estimates (the store re-ranks them exactly).
        """
        k = min(k, self.count if allowed is None else len(allowed))
        if k == 0:
            empty = np.zeros((len(queries), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        selector = None if allowed is None else faiss.IDSelectorBatch(allowed)
        params = None if self.spec.exact and selector is None else self._params(selector)
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)

    def _params(self, selector) -> faiss.SearchParameters:
        # Every search says its own nprobe / efSearch: indexes from with_settings share one FAISS object.
        if self.spec.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=self.spec.ef_search)
        if self.spec.kind in ("ivf", "ivfpq"):
            return faiss.SearchParametersIVF(sel=selector, nprobe=self.spec.nprobe)
        return faiss.SearchParameters(sel=selector)

    def candidates(self, k: int) -> int:
        return self.spec.candidates(k)

    def save(self, path: Path, generation: int) -> None:
        """Write atomically, then stamp: a crash in between leaves a file whose stamp disagrees."""
        temporary = path.with_name(path.name + ".tmp")
        faiss.write_index(self.index, str(temporary))
        fsync(temporary)
        crc = checksum(temporary)  # read back from the page cache it was just written to
        os.replace(temporary, path)
        stamp = Stamp(generation, self.count, path.stat().st_size, self.spec.to_dict(), crc)
        write_atomically(stamp_path(path), json.dumps(stamp.__dict__).encode())
        fsync(path.parent)

    @classmethod
    def load(cls, path: Path, changed: int, generation: int, mapped: bool = False) -> tuple[VectorIndex | None, str]:
        """The index in `path` if it is fresh and intact (see verify); else None and why not.

        `mapped` (for a reader): the vectors of a flat or HNSW index stay in the file's pages,
        mapped read-only, instead of being copied into memory (100,000 vectors of 512-d: 0.15 s
        of a cold query's CPU), and the index cannot change. Writers replace vector files by
        renaming new ones into place, never in place, so what a reader mapped stays the file it
        verified."""
        stamp, problem = verify(path, changed, generation)
        if stamp is None:
            return None, problem
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mapped else 0)
            spec = IndexSpec.from_dict(stamp.spec)
        except (RuntimeError, TypeError) as error:
            return None, f"unreadable ({str(error).splitlines()[0]})"
        if index.ntotal != stamp.count:
            return None, f"holds {index.ntotal} vectors, stamped {stamp.count}"
        return cls(index, spec, mapped), ""


def exact_search_ms(count: int, dim: int, repeats: int = 7) -> float:
    """Milliseconds one exact top-10 search of `count` vectors of `dim` takes on this machine:
    the median of `repeats` single-query searches over up to EXACT_SAMPLE random vectors, scaled
    to `count` (a scan's time is linear in the vectors it reads)."""
    sample = max(1, min(count, EXACT_SAMPLE))
    rng = np.random.default_rng(0)
    index = faiss.IndexFlatIP(dim)
    index.add(rng.random((sample, dim), dtype=np.float32))
    query = rng.random((1, dim), dtype=np.float32)
    index.search(query, 10)  # the first search pays for page faults, not the scan
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        index.search(query, 10)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times) * count / sample


def verify(path: Path, changed: int, generation: int) -> tuple[Stamp | None, str]:
    """The stamp of the vector file in `path` if the file may be served; else None and why not.

    Served: its size and checksum are those stamped, and it was stamped at or after `changed`
    (the last generation that changed this modality's vectors) and not after `generation` (the
    catalog's; a later stamp means the catalog was replaced, say by a restored backup). Reads
    the whole file once, without parsing it.
    """
    stamp, size, why = read_stamp(path, Stamp)
    if stamp is None:
        return None, why
    if size != stamp.size:
        return None, f"truncated or overwritten ({size} bytes, stamped {stamp.size})"
    if not changed <= stamp.generation <= generation:
        return None, f"stale (reflects generation {stamp.generation}; its items changed at {changed})"
    if stamp.checksum is None:
        return None, "stamped without a checksum (by an earlier clipseek), so it cannot be verified"
    try:
        found = checksum(path)
    except FileNotFoundError:  # removed since its size was read (`check --repair` starts so)
        return None, "missing"
    if found != stamp.checksum:
        return None, f"damaged (its content's checksum is {found:08x}, stamped {stamp.checksum:08x})"
    return stamp, ""


def read_stamp(path: Path, kind: type[S]) -> tuple[S | None, int, str]:
    """A derived file's stamp (of dataclass `kind`) and the file's size now; else None and why
    it cannot be served (no file, no stamp, an unreadable one)."""
    try:
        stamp = kind(**json.loads(stamp_path(path).read_bytes()))
    except FileNotFoundError:
        return None, 0, "missing" if not path.exists() else "not stamped"
    except (ValueError, TypeError):
        return None, 0, "its stamp is unreadable"
    try:
        return stamp, path.stat().st_size, ""
    except FileNotFoundError:
        return None, 0, "missing"


def checksum(path: Path) -> int:
    """The CRC-32 of a file's content (zlib's), streamed in blocks through one reused buffer."""
    crc = 0
    buffer = bytearray(CHECKSUM_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as source:
        while read := source.readinto(buffer):
            crc = zlib.crc32(view[:read], crc)
    return crc


def rerank(query: np.ndarray, ids: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k of `ids` nearest to `query` by the exact cosine of their `vectors`: (ids, scores), best first."""
    scores = inner_products(vectors, query)
    order = np.argsort(-scores, kind="stable")[:k]
    return ids[order], scores[order]


def half_inner_products(half: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Each float16 row's inner product with `query`, summed in float32 by FAISS's scalar-quantiser
    search, which widens the halves in SIMD registers as it goes: 1,000 512-d rows in 0.15-0.35 ms,
    where widening them first (FAISS's decoder 0.3-0.5 ms, numpy's astype 0.7) and summing takes
    about twice that. A row's score does not depend on the rows beside it (each is summed alone)."""
    rows = np.ascontiguousarray(half, dtype="<f2")
    scores = np.zeros(len(rows), np.float32)
    if not len(rows):
        return scores
    index = faiss.IndexScalarQuantizer(rows.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    index.add_sa_codes(rows.view(np.uint8))
    found, order = index.search(np.asarray(query, np.float32)[None, :], len(rows))
    scores[order[0]] = found[0]
    return scores


def inner_products(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Each row's inner product with `query`, in float32. einsum sums each row the same way however
    many rows come with it, where BLAS's matrix-vector product may round the last bit differently
    by shape: an item scores the same whichever candidates it is re-ranked among."""
    return np.einsum("ij,j->i", vectors, np.asarray(query, vectors.dtype))


class TuningQueries:
    """Queries drawn from an index's own vectors, with their exact neighbours gathered block by
    block as the vectors are added: the reference that tune() measures recall against."""

    def __init__(self, ids: np.ndarray, queries: np.ndarray, k: int = 10):
        self.ids, self.queries, self.k = ids, np.ascontiguousarray(queries, dtype=np.float32), k
        # k + 1: each query finds itself, a free first hit that is left out of its answers.
        self._scores = np.full((len(ids), k + 1), -np.inf, np.float32)
        self._found = np.full((len(ids), k + 1), -1, np.int64)

    @classmethod
    def drawn(cls, ids: np.ndarray, vectors: np.ndarray, count: int = 200, seed: int = 1) -> TuningQueries:
        """`count` of these vectors, chosen at random, as queries."""
        rows = np.random.default_rng(seed).choice(len(ids), min(count, len(ids)), replace=False)
        return cls(ids[rows], vectors[rows])

    def update(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        scores = self.queries @ np.asarray(vectors, np.float32).T
        found = np.broadcast_to(ids, scores.shape)
        if scores.shape[1] > self.k + 1:  # the block's best k + 1 first: a partition, not a sort
            best = np.argpartition(-scores, self.k, axis=1)[:, : self.k + 1]
            scores, found = np.take_along_axis(scores, best, axis=1), np.take_along_axis(found, best, axis=1)
        scores = np.concatenate([self._scores, scores], axis=1)
        found = np.concatenate([self._found, found], axis=1)
        top = np.argsort(-scores, axis=1, kind="stable")[:, : self.k + 1]
        self._scores, self._found = np.take_along_axis(scores, top, axis=1), np.take_along_axis(found, top, axis=1)

    def truth(self) -> list[np.ndarray]:
        return [row[row != own][: self.k] for row, own in zip(self._found, self.ids, strict=True)]


Embeddings = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # ids → (ids found, their vectors)


def tune(index: VectorIndex, queries: TuningQueries, embeddings: Embeddings, target: float = 0.95) -> VectorIndex:
    """The index searched with the cheapest settings whose recall@k, after exact re-ranking,
    reaches `target`; the recall is recorded in its spec.

    The walk raises nprobe (efSearch for hnsw) while that helps; for ivfpq, whose codes may be too
    coarse to bring the true neighbours into a short list however many clusters are probed, it
    then widens the list of candidates re-ranked. `embeddings` gives the exact vectors of
    candidates, as the store's catalog does when it answers a query.
    """
    if index.spec.exact:
        return index
    truth = queries.truth()
    setting = "ef_search" if index.spec.kind == "hnsw" else "nprobe"
    ladder = [16, 32, 64, 128, 256, 512, 1024] if setting == "ef_search" else _powers(index.spec.nlist)
    shortlists = SHORTLISTS if index.spec.kind == "ivfpq" else [index.spec.candidates(10)]
    step, width, move, stalls = 0, 0, "probe", 0
    measured: list[tuple[dict, float]] = []
    while True:
        settings = {setting: ladder[step], "shortlist": shortlists[width]}
        recall = _recall(index.with_settings(**settings), queries, truth, embeddings)
        measured.append((settings, recall))
        if recall >= target:
            break
        # A move that gains little turns to the other one; when neither helps any more, stop.
        stalled = len(measured) > 1 and recall - measured[-2][1] < 0.005
        stalls = stalls + 1 if stalled else 0
        if stalled:
            move = "widen" if move == "probe" else "probe"
        if move == "widen" and width + 1 == len(shortlists):
            move = "probe"
        if move == "probe" and step + 1 == len(ladder):
            move = "widen" if width + 1 < len(shortlists) else None
        if move is None or stalls == 3:
            break
        step, width = (step + 1, width) if move == "probe" else (step, width + 1)
    # Short of the target: the cheapest setting seen within 0.005 of the best recall.
    top = max(recall for _, recall in measured)
    settings, recall = next((s, r) for s, r in measured if r >= min(target, top - 0.005))
    return index.with_settings(**settings, recall=recall)


SHORTLISTS = [200, 500, 1000, 2000]  # ivfpq: candidates re-ranked for 10 hits, tried in this order


def _recall(index: VectorIndex, queries: TuningQueries, truth: list[np.ndarray], embeddings: Embeddings) -> float:
    k = queries.k
    hits = 0
    for start in range(0, len(queries.ids), 50):  # the candidates' vectors for 50 queries at a time
        block = slice(start, start + 50)
        _, found = index.search(queries.queries[block], index.candidates(k + 1))
        known, vectors = embeddings(np.unique(found[found >= 0]))
        for query, row, own, expected in zip(
            queries.queries[block], found, queries.ids[block], truth[block], strict=True
        ):
            row = row[np.isin(row, known) & (row != own)]
            best, _ = rerank(query, row, vectors[np.searchsorted(known, row)], k)
            hits += len(np.intersect1d(best, expected))
    return hits / (k * len(queries.ids))


def training_size(spec: IndexSpec) -> int:
    """How many vectors an IVF kind is trained on."""
    return (spec.nlist or 0) * TRAINING_SAMPLE


def _powers(limit: int) -> list[int]:
    return [2**i for i in range(int(np.log2(limit)) + 1)]


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of the k most similar `vectors` for each query, by brute force (the reference)."""
    scores = queries @ vectors.T
    top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def _find_clusters_by_graph(index: faiss.IndexIVF) -> None:
    """Replace a trained IVF index's flat coarse quantizer by an HNSW graph over the same centroids
    (FAISS's IVF…_HNSW…): new vectors and queries find their clusters through it. It searches
    max(QUANTIZER_EF, nprobe) candidates, kept in the file."""
    graph = faiss.IndexHNSWFlat(index.d, QUANTIZER_LINKS, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = 2 * QUANTIZER_EF
    graph.hnsw.efSearch = QUANTIZER_EF
    graph.add(index.quantizer.reconstruct_n(0, index.nlist))
    graph.this.disown()  # the IVF index owns it from here, as it owns the quantizer of a file it reads
    index.quantizer = graph
    index.own_fields = True


def _sample(vectors: np.ndarray, count: int) -> np.ndarray:
    if len(vectors) <= count:
        return np.ascontiguousarray(vectors, dtype=np.float32)
    rows = np.random.default_rng(0).choice(len(vectors), count, replace=False)
    return np.ascontiguousarray(vectors[np.sort(rows)], dtype=np.float32)


def read_spec(path: Path) -> IndexSpec:
    """The spec a vector file was stamped with (flat when its stamp is missing or unreadable)."""
    try:
        return IndexSpec.from_dict(json.loads(stamp_path(path).read_bytes()).get("spec"))
    except (OSError, ValueError, TypeError, AttributeError):
        return IndexSpec()


def remove_files(path: Path) -> None:
    for stale in (path, stamp_path(path)):
        stale.unlink(missing_ok=True)


def stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".stamp")


def write_atomically(path: Path, data: bytes) -> None:
    """The temporary file's name is the writer's own: with the catalog on PostgreSQL, several
    writers on one machine note their decisions in one folder at once."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with open(descriptor, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
