"""Re-ranking an approximate index's candidates: from the memory-mapped embeddings file of their
modality (embedding_file.py) where it is sound, else from the catalog.

A writer keeps each file beside its vector file: built when an approximate vector file is built,
checked whole at the end of every writing command (Store.catch_up, which reads the vector files
whole too) and rebuilt then when missing, damaged, made for another precision, or lacking more
than STALE of its items (those added since are re-ranked from the catalog meanwhile), and
removed when the vector file turns exact. A reader never writes one: where it is missing or
unsound, the reader re-ranks from the catalog and says why in one line.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from indexer.store.catalog import MODALITIES, Catalog
from indexer.store.embedding_file import DamagedError, EmbeddingFile, choose_dtype, write
from indexer.store.embedding_file import rerank as rerank_mapped
from indexer.store.vectors import ADD_BLOCK, IndexSpec, read_spec, remove_files, rerank, stamp_path

__all__ = ["STALE", "Reranking"]

log = logging.getLogger("clipseek")

STALE = 0.1  # items added since the file was built, as a share of its rows, past which it is rebuilt


class Reranking:
    """Each modality's embeddings file, mapped once while it stays the same, and re-ranking from it."""

    def __init__(self, root: Path, catalog: Catalog, dim: Callable[[], int]):
        self.root, self.catalog, self._dim = root, catalog, dim
        self._files: dict[str, EmbeddingFile | None] = {}
        self._recheck: set[str] = set()  # mapped before the catalog moved on: kept if unchanged
        self._lock = threading.Lock()  # queries' threads and warm()'s map a file once

    def path(self, modality: str) -> Path:
        return self.root / f"{modality}.embeddings"

    def forget(self) -> None:
        """Check the files again at the next query (the catalog moved on; a writer may have
        rebuilt them). One still the same stays mapped, its pages warm: a row of it stays right
        for its id, and items added since are re-ranked from the catalog."""
        with self._lock:
            self._recheck = set(self._files)

    def warm(self) -> None:
        """Map each modality's file and bring all of it into memory (EmbeddingFile.prefault): a
        server's first queries then read no rows from the disk and fault on no pages."""
        for modality in MODALITIES:
            mapped = self._mapped(modality) if self.path(modality).exists() else None
            if mapped is not None:
                mapped.prefault()

    def reranked(self, modality: str, ids: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k of `ids` nearest to `query` by the exact cosine of their embeddings, best first."""
        mapped = self._mapped(modality)
        if mapped is not None:
            try:
                return rerank_mapped(query, ids, k, mapped, self.catalog.embeddings_of)
            except DamagedError as error:
                log.info("%s: %s; re-ranking from the catalog", self.path(modality).name, error)
                self._files[modality] = None
        found, vectors = self.catalog.embeddings_of(ids)
        if not len(found):
            return found, np.zeros(0, np.float32)
        return rerank(query, found, vectors, k)

    def _mapped(self, modality: str) -> EmbeddingFile | None:
        with self._lock:
            if modality in self._recheck:
                self._recheck.discard(modality)
                held = self._files.pop(modality, None)
                if held is not None and held.unchanged():
                    self._files[modality] = held
            if modality not in self._files:
                mapped, problem = self.open(modality)
                if mapped is None and self.path(modality).exists():
                    log.info("%s: %s; re-ranking from the catalog", self.path(modality).name, problem)
                self._files[modality] = mapped
            return self._files[modality]

    def open(self, modality: str) -> tuple[EmbeddingFile | None, str]:
        return EmbeddingFile.open(self.path(modality), self._dim(), self.catalog.generation())

    # -- writing ---------------------------------------------------------------------------

    def keep_up(self, budget: int, counts: Callable[[], dict[str, int]], rebuilt: Iterable[str] = ()) -> None:
        """Bring each modality's file in line with its vector file just saved (see the module's
        docstring); those of `rebuilt` vector files are made anew. `counts` gives the items per
        modality, asked only for a rebuild (a scan of the catalog)."""
        for modality in MODALITIES:
            self._keep_up(modality, budget, counts, modality in rebuilt)

    def _keep_up(self, modality: str, budget: int, counts: Callable[[], dict[str, int]], rebuild: bool) -> None:
        spec = read_spec(self.root / f"{modality}.faiss")
        path = self.path(modality)
        if spec.exact or not (self.root / f"{modality}.faiss").exists():
            if path.exists() or stamp_path(path).exists():
                remove_files(path)
                self._files.pop(modality, None)
            return
        if not rebuild:
            mapped, problem = self.open(modality)
            problem = problem or mapped.verify_all()
            if not problem:
                lacking = self.catalog.count_after(modality, int(mapped.ids[-1]) if mapped.stamp.count else 0)
                wanted = self.precision(spec, budget, mapped.stamp.count + lacking)
                if lacking <= STALE * mapped.stamp.count and wanted == mapped.stamp.dtype:
                    return
                problem = f"lacks {lacking:,} items added since" if wanted == mapped.stamp.dtype else f"not {wanted}"
            log.info("%s: %s; rebuilding it from the catalog", path.name, problem)
        items = counts()[modality]
        write(
            path,
            self.catalog.vector_blocks(modality, ADD_BLOCK),
            self._dim(),
            self.precision(spec, budget, items),
            self.catalog.generation(),
        )
        self._files.pop(modality, None)

    def precision(self, spec: IndexSpec, budget: int, count: int) -> str:
        dim = self._dim()
        return choose_dtype(count, dim, count * spec.bytes_per_vector(dim), budget)

    # -- reporting -------------------------------------------------------------------------

    def describe(self, modality: str, budget: int) -> str:
        """How an approximate modality re-ranks, for `clipseek status` ("; re-ranked from …"; empty
        for an exact one). Where even float16 does not fit in the memory budget beside the index
        (512-d at 10 million items), the mapping still works, its rows read from disk as far as
        the page cache does not hold them: say so."""
        spec = read_spec(self.root / f"{modality}.faiss")
        if spec.exact:
            return ""
        mapped, problem = self.open(modality)
        if mapped is None:
            return f"; re-ranked from the catalog ({self.path(modality).name} {problem})"
        index_bytes = mapped.stamp.count * spec.bytes_per_vector(self._dim())
        beyond = ", beyond the memory budget" if index_bytes + mapped.stamp.size > budget else ""
        return f"; re-ranked from {self.path(modality).name} ({mapped.describe()}{beyond})"

    def problems(self, modality: str) -> list[str]:
        """What `clipseek check` finds wrong with a modality's file, the whole file read."""
        spec = read_spec(self.root / f"{modality}.faiss")
        path = self.path(modality)
        if spec.exact and not path.exists():
            return []
        mapped, problem = self.open(modality)
        problem = problem or mapped.verify_all()
        return [f"{path.name}: {problem}"] if problem else []
