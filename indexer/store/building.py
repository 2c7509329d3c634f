"""Vector indexes made from the catalog, and the record of why `auto` chose their kind.

A build streams the catalog's embeddings in blocks, so memory holds the new index and one block,
never every embedding at once; the decisions are a small file beside the vector files, since they
belong to the machine that measured them (a catalog row would be a commit that wakes every reader).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from indexer.store.catalog import Catalog
from indexer.store.index_choice import RECALL, Decision
from indexer.store.vectors import (
    ADD_BLOCK,
    IndexSpec,
    TuningQueries,
    VectorIndex,
    training_size,
    tune,
    write_atomically,
)

__all__ = ["DECISIONS", "Progress", "build", "log_progress", "note_decision", "quiet", "read_decisions"]

DECISIONS = "index-choice.json"  # why `auto` chose each kind, on the machine that measured it
Progress = Callable[[str, int, int], None]
log = logging.getLogger("clipseek")

# A long rebuild reports (phase, done, total) as it goes, e.g. ("images: adding", 300_000, 1_000_000);
# a phase with nothing to count reports total 0.


def log_progress(phase: str, done: int, total: int) -> None:
    """Progress as log lines: a phase without a count as it starts; adding, a line per block when
    there are several (a small rebuild says nothing)."""
    if not total:
        log.info("%s", phase)
    elif total > ADD_BLOCK and done:
        log.info("%s: %s of %s (%.0f%%)", phase, f"{done:,}", f"{total:,}", 100 * done / total)


def quiet(phase: str, done: int, total: int) -> None:
    """A reader's rebuild reports no progress: Store.vectors has said in one line why it rebuilds."""


def build(catalog: Catalog, dim: int, modality: str, spec: IndexSpec, count: int, progress: Progress) -> VectorIndex:
    """A vector index of `spec` over the catalog's embeddings of `modality`, streamed from it in
    blocks: memory holds the index and one block, never every embedding at once. IVF kinds
    are trained on a sample first; approximate kinds are then tuned (see vectors.tune).
    `count`, the modality's items, is for progress."""
    name = f"{modality}s"
    training, queries = None, None
    if not spec.exact:
        ids, training = catalog.vector_sample(modality, max(training_size(spec), 200))
        queries = TuningQueries.drawn(ids, training)
        progress(f"{name}: training {spec.kind}" if spec.nlist else f"{name}: building {spec.kind}", 0, 0)
    index = VectorIndex.empty(dim, spec, training)
    del training
    done = 0
    if count:  # a first write builds an empty index: nothing to say
        progress(f"{name}: adding", 0, count)
    for ids, vectors in catalog.vector_blocks(modality, ADD_BLOCK):
        index.add(ids, vectors)
        if queries is not None:
            queries.update(ids, vectors)
        done += len(ids)
        progress(f"{name}: adding", done, max(count, done))
    if queries is None or not done:
        return index
    target = spec.target or RECALL
    progress(f"{name}: tuning to recall@10 ≥ {target:g}", 0, 0)
    return tune(index, queries, catalog.embeddings_of, target)


def note_decision(root: Path, modality: str, decision: Decision | None) -> None:
    """Record why `auto` chose a modality's kind (None: a kind was asked for, or none measured)."""
    path = root / DECISIONS
    try:
        noted = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        noted = {}
    noted[modality] = decision.to_dict() if decision else None
    write_atomically(path, json.dumps(noted, sort_keys=True).encode())


def read_decisions(root: Path) -> dict[str, Decision]:
    """The decisions `auto` last noted, by modality."""
    try:
        noted = json.loads((root / DECISIONS).read_text(encoding="utf-8"))
        return {modality: Decision(**value) for modality, value in noted.items() if value}
    except (OSError, ValueError, TypeError):
        return {}
