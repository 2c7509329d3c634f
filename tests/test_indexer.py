import os
import shutil

import pytest
from PIL import Image

from indexer.demo_world import write_library
from indexer.errors import ClipseekError, IndexLockedError, ModelMismatchError
from indexer.pipeline import Indexer
from indexer.sources.pictures import decode_image
from indexer.store import Store


@pytest.fixture
def library(tmp_path):
    write_library(tmp_path / "library", count=24, seed=11)
    return tmp_path / "library"


def pictures_in(folder, suffix=".jpg"):
    return sorted(path for path in folder.rglob(f"*{suffix}"))


@pytest.fixture
def index_path(catalog_place):
    """The index, on each catalog back end (tests/conftest.py)."""
    return catalog_place


@pytest.fixture
def folder_index(tmp_path):
    """An index folder with an SQLite catalog: for what only it has (a writer lock, the files in it)."""
    return tmp_path / "index"


def never_load():
    raise AssertionError("the model was loaded, so something was decoded")


def rescan(index_path, *roots):
    """Index without a model: proves that nothing is decoded."""
    with Indexer(Store.open(index_path, write=True), never_load) as indexer:
        return indexer.index(roots)


def stored_paths(index_path):
    with Store.open(index_path) as store:
        return {os.fsdecode(path): item for path, item in store.catalog.images().items()}


def test_index_embeds_every_picture_as_the_encoder_does(library, index_path, demo_encoder):
    with Indexer.open(index_path, model="demo") as indexer:
        report = indexer.index([library])
    assert (report.found, report.embedded, report.failed) == (24, 24, 0)
    with Store.open(index_path) as store:
        assert store.check() == []
        ids, vectors = store.catalog.vectors("image")
        assert len(ids) == 24 and store.vectors("image").count == 24
        path = store.catalog.images()[os.fsencode(pictures_in(library)[0])]
    expected = demo_encoder.embed_images([decode_image(path.path, 64).image])[0]
    assert float(vectors[list(ids).index(path.id)] @ expected) > 0.9999


def test_rescan_of_an_unchanged_library_decodes_nothing(library, index_path):
    with Indexer.open(index_path, model="demo") as indexer:
        indexer.index([library])
    report = rescan(index_path, library)
    assert (report.found, report.unchanged, report.embedded) == (24, 24, 0)


def test_moves_copies_and_deletions_reuse_stored_embeddings(library, index_path):
    with Indexer.open(index_path, model="demo") as indexer:
        indexer.index([library])
    before = stored_paths(index_path)
    moved_from = str(library / "album-01/grass")
    grass = {p: item for p, item in before.items() if p.startswith(moved_from)}
    shutil.move(moved_from, library / "album-01/lawn")
    shutil.copy(pictures_in(library / "album-01/sand")[0], library / "copy.jpg")
    deleted = next(p for p in before if "/water/" in p)
    os.remove(deleted)

    report = rescan(index_path, library)
    assert (report.moved, report.reused, report.removed, report.embedded) == (len(grass), 1, 1, 0)
    after = stored_paths(index_path)
    assert len(after) == 24
    for path, item in grass.items():
        assert after[path.replace("/grass/", "/lawn/")].id == item.id  # same item, same embedding
    assert deleted not in after
    with Store.open(index_path) as store:
        assert store.check() == []


def test_new_and_changed_files_are_embedded(library, index_path):
    with Indexer.open(index_path, model="demo") as indexer:
        indexer.index([library])
    changed = pictures_in(library / "album-01/sand")[0]
    old_id = stored_paths(index_path)[str(changed)].id
    Image.new("RGB", (200, 200), (250, 0, 0)).save(changed)
    Image.new("RGB", (200, 200), (0, 0, 250)).save(library / "new.png")
    with Indexer.open(index_path) as indexer:  # its own model, from the index
        report = indexer.index([library])
    assert (report.embedded, report.unchanged) == (2, 23)
    after = stored_paths(index_path)
    assert after[str(changed)].id != old_id and str(library / "new.png") in after


def test_bad_files_are_recorded_and_not_retried_until_they_change(library, index_path):
    (library / "broken.jpg").write_bytes(b"not a picture at all")
    (library / "empty.png").write_bytes(b"")
    with Indexer.open(index_path, model="demo") as indexer:
        report = indexer.index([library])
    assert (report.embedded, report.failed) == (24, 2)
    assert sorted(reason for _, reason in report.failures)[0] == "empty file"
    with Store.open(index_path) as store:
        assert store.status().failures == 2

    assert rescan(index_path, library).known_failures == 2  # not decoded again

    Image.new("RGB", (100, 100), (0, 200, 0)).save(library / "broken.jpg", format="JPEG")
    with Indexer.open(index_path) as indexer:
        report = indexer.index([library])
    assert (report.embedded, report.known_failures) == (1, 1)
    with Store.open(index_path) as store:
        assert [path for path, _ in store.catalog.failure_list()] == [str(library / "empty.png")]


def test_a_name_that_is_not_utf8_is_kept_byte_for_byte(tmp_path, index_path):
    raw = os.fsencode(tmp_path / "pictures") + b"/caf\xe9.png"
    os.makedirs(os.path.dirname(raw))
    Image.new("RGB", (80, 80), (9, 9, 200)).save(raw.decode("utf-8", "surrogateescape"), format="PNG")
    with Indexer.open(index_path, model="demo") as indexer:
        indexer.index([tmp_path / "pictures"])
    with Store.open(index_path) as store:
        assert list(store.catalog.images()) == [raw]


def test_a_missing_root_changes_nothing(library, index_path):
    with Indexer.open(index_path, model="demo") as indexer:
        indexer.index([library])
        with pytest.raises(ClipseekError, match="does not exist"):
            indexer.index([library / "unplugged-disk"])
    assert len(stored_paths(index_path)) == 24


def test_another_model_is_refused(library, index_path):
    with Indexer.open(index_path, model="demo") as indexer:
        indexer.index([library])
    with pytest.raises(ModelMismatchError, match="made with demo"):
        Indexer.open(index_path, model="ViT-B-32")


def test_one_writer_at_a_time(folder_index):
    with Indexer.open(folder_index, model="demo"):
        with pytest.raises(IndexLockedError, match=f"being written by process {os.getpid()}"):
            Store.open(folder_index, write=True)
        Store.open(folder_index).close()  # readers are never blocked


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_vector_file_is_detected_and_rebuilt(library, folder_index, damage):
    index_path = folder_index
    with Indexer.open(index_path, model="demo") as indexer:
        indexer.index([library])
    vectors = index_path / "image.faiss"
    if damage == "truncate":
        vectors.write_bytes(vectors.read_bytes()[:500])
    else:
        vectors.unlink()
    with Store.open(index_path) as store:
        assert store.check() and "image.faiss" in store.check()[0]
        assert store.vectors("image").count == 24  # rebuilt in memory, never served damaged
    with Store.open(index_path, write=True) as store:
        store.repair()
    with Store.open(index_path) as store:
        assert store.check() == []


def test_captions_are_embedded_once_per_collection(tmp_path, index_path, demo_encoder):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\na blue star\na red circle\n\na green cross\n")
    with Indexer.open(index_path, model="demo") as indexer:
        first = indexer.add_captions(captions, "shapes")
        again = indexer.add_captions(captions, "shapes")
        other = indexer.add_captions(captions, "other")
    assert (first.added, first.duplicates) == (3, 1)
    assert (again.added, again.duplicates) == (0, 4)
    assert other.added == 3
    with Store.open(index_path) as store:
        assert store.status().counts == [("text", "other", 3), ("text", "shapes", 3)]
        scores, _ = store.vectors("text").search(demo_encoder.embed_texts(["a blue star"]), 1)
        assert float(scores[0, 0]) > 0.9999
    with Store.open(index_path, write=True) as store:
        assert store.remove(collection="shapes") == 3
        assert store.check() == []
