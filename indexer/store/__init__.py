"""The on-disk index: a folder holding the catalog (the truth) and the vector files derived from it.

    catalog.sqlite            items, their embeddings, failures, model identity, generation
    catalog.url               or: the PostgreSQL database holding the catalog (no password)
    image.faiss, text.faiss   one vector file per modality, stamped with the generation
    image.embeddings, ...     an approximate kind's embeddings, memory-mapped to re-rank from (reranking.py)
    index-choice.json         why `auto` chose each kind (building.py), on the machine that measured it
    writer.lock               held (flock) by the one process writing; holds its pid (writer.py)

The Store keeps the two in agreement: every write goes through `Store.write()`, which commits
the catalog first and then applies the same change to the in-memory vector indexes; `flush()`
saves those, stamped. A vector file that is missing, damaged or stale is rebuilt from the
catalog, never served: in memory by a reader, which says so in one line; on disk by a writer,
and every writing command ends by catching up any such file (`catch_up`), so that rerunning a
command a crash interrupted leaves the index consistent.

With the catalog on PostgreSQL the folder holds only derived files, local to each machine, and
several processes (on this machine and others) may write at once: each stamps its vector files
with the generation they really reflect (the last of its own commits that followed the one its
index already reflected), so that a file missing another writer's commits is seen as stale and
caught up from the catalog, never served.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer.config import CATALOG_URL, index_dir, is_catalog_url, without_password
from indexer.errors import IndexNotFoundError, ModelMismatchError, StoreError
from indexer.models.identity import ModelId, sha256_file
from indexer.store import index_choice
from indexer.store.building import Progress, build, log_progress, note_decision, quiet, read_decisions
from indexer.store.catalog import MODALITIES, Catalog, Filters, NewCaption, NewImage, StoredImage
from indexer.store.reranking import Reranking
from indexer.store.vectors import (
    IndexSpec,
    Stamp,
    VectorIndex,
    read_spec,
    read_stamp,
    remove_files,
    verify,
)
from indexer.store.writer import StoreWriter, hold_local_lock, take_writer_lock

__all__ = [
    "MODALITIES",
    "Filters",
    "IndexSpec",
    "NewCaption",
    "NewImage",
    "Progress",
    "Store",
    "StoreStatus",
    "StoredImage",
    "is_under",
]

log = logging.getLogger("clipseek")

CATALOG = "catalog.sqlite"
EXACT_FILTER = 20_000  # filters matching at most this many items are searched exactly (~40 MB of embeddings at 512-d)


@dataclass(frozen=True)
class StoreStatus:
    path: str
    model: ModelId | None
    index_type: str  # per modality: its vector file's kind, settings and measured recall
    generation: int
    updated_at: float | None
    counts: list[tuple[str, str | None, int]]  # (modality, collection, items)
    failures: int
    bytes_on_disk: dict[str, int]
    embedded_on: str | None = None  # where the latest pictures were embedded: "cpu (ONNX Runtime)"
    # Per modality with a vector file here: (the generation it reflects, whether commits since
    # changed its vectors: caught up by the next writing command; searches meanwhile read the catalog).
    vector_files: dict[str, tuple[int, bool]] = field(default_factory=dict)


class Store:
    """One index folder, opened for reading or (by one process at a time) for writing."""

    def __init__(self, root: Path, catalog: Catalog, lock: int | None, writable: bool):
        self.root = root
        self.catalog = catalog
        self._lock = lock
        self.writable = writable
        self._vectors: dict[str, VectorIndex] = {}
        self._reflects: dict[str, int] = {}  # the generation each in-memory vector index reflects
        self._dirty: set[str] = set()
        self._seen_generation = catalog.generation()
        self._model_id: ModelId | None = None
        self.reranking = Reranking(root, catalog, lambda: self.model_id.dim)

    @classmethod
    def open(cls, where: str | os.PathLike, write: bool = False, create: bool = False) -> Store:
        """The index in folder `where`, or the one whose catalog is in the PostgreSQL database
        `where` names by URL (its vector files in a local folder; see indexer.config)."""
        url = os.fspath(where) if is_catalog_url(os.fspath(where)) else None
        root = index_dir(url) if url else Path(where)
        if url is None and (root / CATALOG_URL).is_file():  # a named index whose settings point there
            url = (root / CATALOG_URL).read_text(encoding="utf-8").strip()
        if url is None:
            if not (root / CATALOG).is_file():
                if not create:
                    raise IndexNotFoundError(f"no index at {root}: create one with `clipseek index FOLDER`")
                root.mkdir(parents=True, exist_ok=True)
            lock = take_writer_lock(root) if write else None
            return cls(root, Catalog(root / CATALOG, readonly=not write), lock, write)
        # PostgreSQL: no writer lock; the database's own locking keeps concurrent writers apart.
        catalog = Catalog(url, readonly=not write, name=without_password(url), create=create)
        root.mkdir(parents=True, exist_ok=True)
        if not (root / CATALOG_URL).exists():
            (root / CATALOG_URL).write_text(without_password(url) + "\n", encoding="utf-8")
        return cls(root, catalog, None, write)

    @property
    def location(self) -> str:
        """Where the index is, for messages: its folder, or its catalog's URL (no password) and folder."""
        if self.catalog.concurrent:
            return f"{self.catalog.name} (vector files in {self.root})"
        return str(self.root)

    def close(self) -> None:
        if self.writable:
            self.flush()
        self.catalog.close()
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the model -------------------------------------------------------------------------

    @property
    def model_id(self) -> ModelId | None:
        """The model the index was made with; None until the first model is claimed."""
        if self._model_id is None:  # read once known: it never changes after that
            stored = self.catalog.get("model")
            self._model_id = ModelId.from_dict(json.loads(stored)) if stored else None
        return self._model_id

    @property
    def model_checkpoint(self) -> str | None:
        """The checkpoint path the model was loaded from, if it came from a file."""
        return self.catalog.get("model_checkpoint")

    def claim_model(self, model_id: ModelId, checkpoint: str | None) -> None:
        """Record the model of a new index; an index that has one only accepts the same."""
        stored = self.model_id
        if stored is None:
            with self.catalog.write() as writer:
                writer.set("model", model_id.to_dict())
                if checkpoint:
                    writer.set("model_checkpoint", str(Path(checkpoint).resolve()))
        elif stored != model_id:
            raise self.mismatch(model_id)

    def check_checkpoint(self, checkpoint: str | os.PathLike | None) -> None:
        """A checkpoint given for this index's model (say, moved) must hold its weights: same sha256."""
        stored = self.model_id
        if checkpoint is not None and stored is not None and sha256_file(checkpoint) != stored.checkpoint_sha256:
            raise self.mismatch(checkpoint)

    def mismatch(self, asked: object) -> ModelMismatchError:
        return ModelMismatchError(
            f"the index at {self.root} was made with {self.model_id}, not {asked}; "
            "leave out the model options to use its own model, or choose another --index"
        )

    # -- writing ---------------------------------------------------------------------------

    @contextmanager
    def write(self, index_vectors: bool = True) -> Iterator[StoreWriter]:
        """One catalog transaction; after it commits, the vector indexes get the same change.

        A bulk load passes index_vectors=False: only the catalog changes, so nothing is held in
        memory beyond the batch, and the vector files of the modalities it changed go stale, to be
        rebuilt from the catalog, as the kind that fits, by the next fit() or optimize().
        """
        with self.catalog.write() as writer:
            store_writer = StoreWriter(writer, self.vectors if index_vectors else None)
            yield store_writer
        self._advance()
        if not index_vectors:
            for modality in writer.modalities:
                self._vectors.pop(modality, None)
                self._dirty.discard(modality)
            return
        for modality, (ids, vectors) in store_writer.added.items():
            if ids:
                self.vectors(modality).add(np.asarray(ids), np.stack(vectors))
                self._dirty.add(modality)
        if store_writer.removed:
            for modality in MODALITIES:  # removing an id a modality does not hold is a no-op
                self.vectors(modality).remove(store_writer.removed)
                self._dirty.add(modality)

    def _advance(self) -> None:
        """Move each in-memory index's generation past this process's own commits that follow it
        (their changes are in it), up to the first commit of another writer (whose are not)."""
        for modality, reflects in self._reflects.items():
            while reflects + 1 in self.catalog.committed:
                reflects += 1
            self._reflects[modality] = reflects

    def flush(self) -> None:
        """Save the vector files that changed, stamped with the catalog generation they reflect:
        the catalog's own with one writer, else the one tracked since each was loaded."""
        if not self._dirty:
            return
        generation = self.catalog.generation()
        self._advance()
        # Writers on one machine (a PostgreSQL catalog has several) save one at a time.
        with hold_local_lock(self.root) if self.catalog.concurrent else nullcontext():
            for modality in sorted(self._dirty):
                stamped = self._reflects[modality] if self.catalog.concurrent else generation
                self._vectors[modality].save(self._vector_path(modality), stamped)
        self._dirty.clear()

    def remove(self, paths: list[str | os.PathLike] = (), collection: str | None = None) -> int:
        """Remove the pictures at or under `paths`, and the captions of `collection`; returns how many."""
        targets = [os.fsencode(os.path.abspath(path)) for path in paths]
        images = self.catalog.images()
        ids = [item.id for path, item in images.items() if is_under(path, targets)]
        with self.write() as writer:
            writer.delete_items(ids)
            removed = len(ids) + (writer.delete_collection(collection) if collection else 0)
        self.catch_up()
        return removed

    def refresh(self) -> None:
        """Drop what was loaded if another process committed since (for readers)."""
        generation = self.catalog.generation()
        if generation != self._seen_generation:
            self._vectors = {}
            self._reflects = {}
            self.reranking.forget()
            self._seen_generation = generation

    # -- vectors ---------------------------------------------------------------------------

    def _vector_path(self, modality: str) -> Path:
        return self.root / f"{modality}.faiss"

    def holds(self, modality: str) -> bool:
        """Whether the vector index of a modality is in memory already (vectors() returns at once)."""
        return modality in self._vectors

    def vectors(self, modality: str) -> VectorIndex:
        """The vector index of a modality: its file when fresh and intact, else rebuilt from the catalog.

        A rebuild says why in one line (none for a modality that never had vectors). A writer
        saves the rebuilt index at its next flush and reports the rebuild's progress; a reader
        reports none (a search's output is its hits) and keeps it in memory only, except beside a
        PostgreSQL catalog, where the folder is this machine's own derived data: there it saves it
        too, so that the next process on a machine that only reads need not rebuild it.
        """
        if modality not in self._vectors:
            generation = self.catalog.generation()  # read first: what is loaded reflects at least this
            index, problem = self._load(modality, generation)
            if index is None:
                if self._ever_stored(modality):
                    log.info("%s: %s; catching up from the catalog", self._vector_path(modality).name, problem)
                index = self._rebuild(modality, log_progress if self.writable else quiet)
                if self.writable:
                    self._dirty.add(modality)
                elif self.catalog.concurrent:
                    self._save_for_readers(modality, index, generation)
            self._vectors[modality] = index
            self._reflects[modality] = generation
        return self._vectors[modality]

    def _save_for_readers(self, modality: str, index: VectorIndex, generation: int) -> None:
        try:
            with hold_local_lock(self.root):
                index.save(self._vector_path(modality), generation)
        except OSError as error:  # a folder this reader may not write: it searches from memory
            log.info("%s: not saved (%s)", self._vector_path(modality).name, error)

    def catch_up(self) -> None:
        """Bring every vector file up to date with the catalog, rebuilding those that are missing,
        damaged or stale, and save what changed: the last step of every writing command, even one
        with nothing else to do, so that rerunning a command killed between its catalog commit and
        its vector files leaves them consistent. A file already held in memory is saved as it is."""
        for modality in MODALITIES:
            if modality in self._vectors and self._reflects[modality] < self.catalog.vectors_changed(modality):
                # Another writer's commits came between this one's: its index lacks them.
                log.info("%s: behind another writer's commits; catching up from the catalog", f"{modality}.faiss")
                self._vectors.pop(modality)
                self._dirty.discard(modality)
                self.vectors(modality)
            if modality not in self._vectors and self._ever_stored(modality):
                stamp, _ = verify(
                    self._vector_path(modality), self.catalog.vectors_changed(modality), self.catalog.generation()
                )
                if stamp is None:
                    self.vectors(modality)
        self.flush()
        self.reranking.keep_up(self.index_setting()[1], self._counts)

    def _ever_stored(self, modality: str) -> bool:
        """Whether a modality has a vector file to keep: one is on disk, or its vectors ever changed."""
        return self._vector_path(modality).exists() or self.catalog.vectors_changed(modality) > 0

    def _load(self, modality: str, generation: int | None = None) -> tuple[VectorIndex | None, str]:
        changed = self.catalog.vectors_changed(modality)
        generation = self.catalog.generation() if generation is None else generation
        return VectorIndex.load(self._vector_path(modality), changed, max(generation, changed), not self.writable)

    def _rebuild(self, modality: str, progress: Progress) -> VectorIndex:
        """A modality's vector index from the catalog, of the kind last chosen for it (flat when
        there are too few vectors left to train that kind)."""
        spec = IndexSpec.from_dict(json.loads(self.catalog.get(f"index_spec.{modality}") or "null"))
        count = self._counts()[modality]
        if not spec.exact and count < (spec.nlist or 0) * index_choice.MIN_PER_CLUSTER + 1:
            spec = IndexSpec()
        return build(self.catalog, self.model_id.dim, modality, spec, count, progress)

    def _counts(self) -> dict[str, int]:
        """Items per modality (one scan of the catalog: seconds at ten million items)."""
        counts = dict.fromkeys(MODALITIES, 0)
        for modality, _, count in self.catalog.counts():
            counts[modality] += count
        return counts

    # -- searching -------------------------------------------------------------------------

    def nearest(
        self, modality: str, vector: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k items of `modality` (among `allowed`) nearest to `vector`: (ids, cosine similarities), best first.

        Approximate kinds give candidates, re-ranked by the exact cosine of the catalog's
        embeddings (read from their memory-mapped copy where it is sound: reranking.py), so
        scores are always true similarities. A filter matching up to
        EXACT_FILTER items is answered exactly from their embeddings (cheaper than a filtered
        graph or cluster walk, and never short); a wider one through the index, topped up
        exactly when it comes back short. So a filter never gives fewer than k hits when k
        items match.
        """
        index = self.vectors(modality)
        if not index.spec.exact and allowed is not None and len(allowed) <= EXACT_FILTER:
            return self._reranked(modality, allowed, vector, k)
        scores, ids = index.search(vector[None, :], index.candidates(k), allowed)
        found, scores = ids[0][ids[0] >= 0], scores[0][ids[0] >= 0]
        if index.spec.exact:
            return found, _cosine(scores)
        if len(found) < min(k, index.count if allowed is None else len(allowed)):
            found = allowed if allowed is not None else index.ids()
        return self._reranked(modality, found, vector, k)

    def _reranked(self, modality: str, ids: np.ndarray, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        found, scores = self.reranking.reranked(modality, ids, vector, k)
        return found, _cosine(scores)

    def index_setting(
        self, kind: str | None = None, budget: int | None = None, latency_ms: float | None = None
    ) -> tuple[str, int, float]:
        """The index type, memory budget and latency budget this index keeps to (default auto,
        4 GiB, 10 ms); given ones are remembered."""
        setting = json.loads(self.catalog.get("index_setting") or "{}")
        given = (("kind", kind), ("budget", budget), ("latency_ms", latency_ms))
        asked = {key: value for key, value in given if value is not None}
        if asked and {**setting, **asked} != setting:
            index_choice.check_kind(asked.get("kind", "auto"))
            setting = {**setting, **asked}
            with self.catalog.write() as writer:
                writer.set("index_setting", setting)
        return (
            setting.get("kind", "auto"),
            setting.get("budget", index_choice.DEFAULT_BUDGET),
            setting.get("latency_ms", index_choice.DEFAULT_LATENCY_MS),
        )

    def fit(self, progress: Progress = log_progress) -> dict[str, IndexSpec]:
        """Rebuild the vector files that are stale (after a bulk load) or whose kind no longer fits:
        exact search got slower than the latency budget on this machine (or faster again), or the
        index type or budgets changed. What fits already is left alone (`optimize` retunes it); a
        kind that cannot be built yet (too few vectors, too small a budget) is said, and the files
        stay as they are."""
        kind, budget, latency = self.index_setting()
        counts = self._counts()
        plan = {}
        for modality, count in counts.items():
            generation = self.catalog.generation()
            current = self._vectors.get(modality)
            if current is None and (current := self._load(modality, generation)[0]) is not None:
                self._vectors[modality] = current
                self._reflects[modality] = generation
            elif not count:
                continue
            was = current.spec.kind if current is not None else None
            try:
                spec, decision = index_choice.choose(count, self.model_id.dim, kind, budget, latency, was)
            except StoreError as error:
                progress(f"{modality}s: {error}; the vector file stays {was or 'as last built'}", 0, 0)
                continue
            note_decision(self.root, modality, decision)
            if spec.kind != was:
                plan[modality] = spec
        return self._rebuild_as(plan, counts, progress)

    def optimize(
        self,
        kind: str = "auto",
        budget: int = index_choice.DEFAULT_BUDGET,
        progress: Progress = log_progress,
        latency_ms: float = index_choice.DEFAULT_LATENCY_MS,
    ) -> dict[str, IndexSpec]:
        """Rebuild each modality's vector file as the kind that fits it now (index_choice.choose),
        tuned to its recall target; the old file serves readers until the new one replaces it."""
        counts = self._counts()
        plan = {}
        for modality, count in counts.items():
            if count:
                plan[modality], decision = index_choice.choose(count, self.model_id.dim, kind, budget, latency_ms)
                note_decision(self.root, modality, decision)
        chosen = self._rebuild_as(plan, counts, progress)
        self.catch_up()  # a modality left with no items may still have a stale file
        return chosen

    def _rebuild_as(
        self, plan: dict[str, IndexSpec], counts: dict[str, int], progress: Progress
    ) -> dict[str, IndexSpec]:
        chosen = {}
        for modality, spec in plan.items():
            self._vectors.pop(modality, None)  # the old index's memory, free for the new one
            self._reflects[modality] = self.catalog.generation()
            index = build(self.catalog, self.model_id.dim, modality, spec, counts[modality], progress)
            with self.catalog.write() as writer:  # first: a rebuild after a crash makes this kind again
                writer.set(f"index_spec.{modality}", index.spec.to_dict())
            self._vectors[modality] = index
            self._dirty.add(modality)
            self.flush()
            self.reranking.keep_up(self.index_setting()[1], self._counts, rebuilt=[modality])
            chosen[modality] = index.spec
        return chosen

    def decisions(self) -> dict[str, index_choice.Decision]:
        """Why `auto` chose each modality's kind, as last noted (none where a kind was asked for)."""
        return read_decisions(self.root)

    def check(self) -> list[str]:
        """Everything that disagrees between catalog and vector files; empty when consistent."""
        problems = self.catalog.integrity_problems()
        for modality in MODALITIES:
            path = self._vector_path(modality)
            ids = np.sort(self.catalog.matching_ids(modality, Filters()))
            if not len(ids) and not path.exists():
                continue
            index, problem = self._load(modality)
            if index is None:
                problems.append(f"{path.name}: {problem}")
            elif not np.array_equal(np.sort(index.ids()), ids):
                problems.append(f"{path.name}: its ids differ from the catalog's {modality} items")
            problems += self.reranking.problems(modality)
        return problems

    def repair(self) -> None:
        """Rebuild every vector file from the catalog."""
        for modality in MODALITIES:
            remove_files(self._vector_path(modality))
            self._reflects[modality] = self.catalog.generation()
            self._vectors[modality] = self._rebuild(modality, log_progress)
            self._dirty.add(modality)
        self.flush()
        self.reranking.keep_up(self.index_setting()[1], self._counts, rebuilt=MODALITIES)

    def status(self) -> StoreStatus:
        sizes = {}
        for name in (CATALOG, CATALOG + "-wal", "image.faiss", "text.faiss", "image.embeddings", "text.embeddings"):
            if (self.root / name).exists():
                sizes[name] = (self.root / name).stat().st_size
        updated = self.catalog.get("updated_at")
        decisions = self.decisions()
        _, budget, _ = self.index_setting()
        return StoreStatus(
            path=self.location,
            model=self.model_id,
            index_type=", ".join(
                f"{modality}s {read_spec(self._vector_path(modality)).describe()}"
                + (f"; {decisions[modality].describe()}" if modality in decisions else "")
                + self.reranking.describe(modality, budget)
                for modality in MODALITIES
                if self._vector_path(modality).exists()
            )
            or "flat (exact search)",
            generation=self.catalog.generation(),
            updated_at=float(updated) if updated else None,
            counts=self.catalog.counts(),
            failures=self.catalog.failure_count(),
            bytes_on_disk=sizes,
            embedded_on=self.catalog.get("embedded_on"),
            vector_files=self._vector_file_generations(),
        )

    def _vector_file_generations(self) -> dict[str, tuple[int, bool]]:
        found = {}
        for modality in MODALITIES:
            stamp, _, _ = read_stamp(self._vector_path(modality), Stamp)
            if stamp is not None:
                found[modality] = (stamp.generation, stamp.generation < self.catalog.vectors_changed(modality))
        return found


def _cosine(scores: np.ndarray) -> np.ndarray:
    """Scores as cosine similarities, within [-1, 1]: float32 inner products of unit vectors round
    a hair past them (an item found by its own vector scores 1.0000002), which a caller comparing
    with 1 or printing a percentage should never see."""
    return np.clip(scores, -1.0, 1.0)


def is_under(path: bytes, roots: Iterable[bytes]) -> bool:
    """Whether `path` is one of `roots` or inside one of them."""
    return any(path == root or path.startswith(root.rstrip(b"/") + b"/") for root in roots)
