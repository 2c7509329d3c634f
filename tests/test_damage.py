"""Damaged vector files as a user meets them: bytes overwritten on disk (same size, stamp intact)
are never served, `check` names the file and `check --repair` or any writing command fixes it;
stamps from before checksums are rebuilt; a score is always a cosine, within [-1, 1]."""

import json
from pathlib import Path

import numpy as np
import pytest

from indexer.demo_world import write_library
from indexer.pipeline import Indexer
from search.engine import Query, SearchEngine
from tests.command_line import clipseek, indexed_demo_library


@pytest.fixture
def demo_index(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPSEEK_HOME", str(tmp_path / "home"))
    return indexed_demo_library(tmp_path)


def overwrite_middle(path: Path, count: int = 512) -> None:
    """Random bytes over the middle of a file, as a bad disk sector or a stray write leaves it:
    the same size, and its stamp untouched."""
    size = path.stat().st_size
    with open(path, "r+b") as file:
        file.seek(size // 2)
        file.write(np.random.default_rng(0).integers(0, 256, count, dtype=np.uint8).tobytes())
    assert path.stat().st_size == size


def hits(result) -> list[tuple[str, float]]:
    return [(hit["path"], hit["score"]) for hit in json.loads(result.stdout)["hits"]]


def test_a_vector_file_overwritten_in_the_middle_is_never_served(demo_index):
    library, root = demo_index
    before = hits(clipseek("search", "a red circle", "--json"))
    stamp = (root / "image.faiss.stamp").read_bytes()
    overwrite_middle(root / "image.faiss")

    search = clipseek("search", "a red circle", "--json")
    assert hits(search) == before  # the same pictures and scores, from vectors rebuilt from the catalog
    assert search.stderr.splitlines() == [search.stderr.strip()] and "image.faiss: damaged" in search.stderr

    broken = clipseek("check", check=False)
    assert broken.returncode == 1 and broken.stdout.startswith("image.faiss: damaged")
    assert (root / "image.faiss.stamp").read_bytes() == stamp  # a reader never writes
    clipseek("check", "--repair")
    assert "ok" in clipseek("check").stderr

    overwrite_middle(root / "text.faiss")
    assert "removed 0 items" in clipseek("remove", library / "nowhere").stderr  # a writing command with nothing to do
    assert "ok" in clipseek("check").stderr
    assert hits(clipseek("search", "a red circle", "--json")) == before


def test_a_stamp_without_a_checksum_is_rebuilt_by_the_next_writing_command(demo_index):
    library, root = demo_index
    stamp_path = root / "image.faiss.stamp"
    stamp = json.loads(stamp_path.read_text())
    del stamp["checksum"]  # as clipseek wrote stamps before they carried one
    stamp_path.write_text(json.dumps(stamp))

    old = clipseek("check", check=False)
    assert old.returncode == 1 and old.stdout.startswith("image.faiss: stamped without a checksum")
    assert json.loads(clipseek("index", library, "--json").stdout)["unchanged"] == 24
    assert "ok" in clipseek("check").stderr
    assert isinstance(json.loads(stamp_path.read_text())["checksum"], int)


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
