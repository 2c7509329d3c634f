"""Damaged vector files as a user meets them; a score is always a cosine, within [-1, 1]."""

import numpy as np

from indexer.demo_world import write_library
from indexer.pipeline import Indexer
from search.engine import Query, SearchEngine


def test_every_score_is_a_cosine_within_minus_one_and_one(tmp_path):
    library = tmp_path / "library"
    write_library(library, count=24, seed=7)
    with Indexer.open(tmp_path / "index", model="demo") as indexer:
        indexer.index([library])
    with SearchEngine.open(tmp_path / "index") as engine:
        ids = [hit.id for hit in engine.search(Query.text("a picture"), k=24)]
        # Each picture found by its own vector: float32 inner products of unit vectors round past 1.
        own = [engine.search(Query.item(item), k=24) for item in ids]
    scores = np.array([[hit.score for hit in found] for found in own])
    assert scores.max() <= 1.0 and scores.min() >= -1.0
    assert scores[:, 0].min() > 0.9999  # each found itself first
