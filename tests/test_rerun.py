"""A writing command killed between its catalog commit and its vector files: rerunning it (or
running any writing command) ends with `check` passing, and a search meanwhile says one line.

The crash is reproduced exactly: the catalog change is committed through the Store's catalog and
the vector files are left as they were, which is what a kill after the commit leaves.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from indexer.store import Filters, Store, is_under
from tests.command_line import clipseek, indexed_demo_library
from tests.test_index_types import make_index, unit


def commit_only(root: Path, ids: list[int]) -> None:
    """The catalog without `ids`, committed; the vector files untouched (a kill right after the commit)."""
    with Store.open(root, write=True) as store, store.catalog.write() as writer:
        writer.delete_items(ids)


@pytest.fixture
def killed_remove(tmp_path, monkeypatch):
    """`clipseek remove LIBRARY/album-01/grass --collection demo`, killed after its catalog commit."""
    monkeypatch.setenv("CLIPSEEK_HOME", str(tmp_path / "home"))
    library, root = indexed_demo_library(tmp_path)
    grass = library / "album-01" / "grass"
    with Store.open(root) as store:
        pictures = [item.id for path, item in store.catalog.images().items() if is_under(path, [os.fsencode(grass)])]
        captions = [int(i) for i in store.catalog.matching_ids("text", Filters(collection="demo"))]
    assert pictures and captions
    commit_only(root, pictures + captions)
    return library, grass, len(pictures)


def stale_files(result) -> list[str]:
    return sorted(line.split(":")[0] for line in result.stdout.splitlines() if ": stale" in line)


@pytest.mark.parametrize("command", ["remove", "index", "add-captions", "optimize"])
def test_a_writing_command_after_a_killed_remove_leaves_the_index_consistent(killed_remove, tmp_path, command):
    library, grass, removed = killed_remove
    meanwhile = clipseek("search", "a red circle", "-k", "24", "--json")
    assert not any(str(grass) in hit["path"] for hit in json.loads(meanwhile.stdout)["hits"])
    assert len(meanwhile.stderr.splitlines()) <= 1 and "catching up" in meanwhile.stderr
    broken = clipseek("check", check=False)
    assert broken.returncode == 1 and stale_files(broken) == ["image.faiss", "text.faiss"]

    (tmp_path / "none.txt").write_text("")
    rerun = {
        "remove": ["remove", grass, "--collection", "demo"],  # the killed command itself
        "index": ["index", library / "album-01" / "water"],  # nothing new there
        "add-captions": ["add-captions", tmp_path / "none.txt", "--collection", "demo"],  # no captions
        "optimize": ["optimize"],
    }[command]
    said = clipseek(*rerun).stderr
    if command == "remove":
        assert "removed 0 items" in said

    assert "ok" in clipseek("check").stderr
    after = clipseek("search", "a red circle", "-k", "24", "--json")
    assert after.stderr == "" and len(json.loads(after.stdout)["hits"]) == 24 - removed


def test_a_search_over_a_stale_approximate_file_says_one_line_and_no_progress(tmp_path):
    root = tmp_path / "index"
    planted = unit(np.random.default_rng(5).normal(size=(12, 64)))
    ids = make_index(root, 4000, planted)
    clipseek("optimize", "--index", root, "--index-type", "ivf")
    gone = ids[:10]  # the near copies of the first planted vector, /photos/000000.jpg to 000009.jpg
    commit_only(root, gone.tolist())

    search = clipseek("search", "--item", ids[10], "--index", root, "-k", "5", "--json")
    said = search.stderr.splitlines()
    assert len(said) == 1 and said[0].startswith("image.faiss: stale (")
    assert said[0].endswith("; catching up from the catalog")
    assert not {hit["id"] for hit in json.loads(search.stdout)["hits"]} & set(gone.tolist())

    paths = [f"/photos/{n:06d}.jpg" for n in range(10)]
    assert "removed 0 items" in clipseek("remove", *paths, "--index", root).stderr
    assert "ok" in clipseek("check", "--index", root).stderr
    assert clipseek("search", "--item", ids[10], "--index", root, "-k", "5").stderr == ""
    assert "images ivf (" in json.loads(clipseek("status", "--index", root, "--json").stdout)["index_type"]
