import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.demo_world import write_library
from indexer.errors import IndexNotFoundError, ModelError, QueryError
from indexer.pipeline import Indexer
from search.engine import MAX_K, Hit, Query, SearchEngine


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A demo library in folders whose names need escaping, indexed, with its captions."""
    root = tmp_path_factory.mktemp("engine")
    library = root / "my_photos%2021"
    pictures = write_library(library, count=120, seed=21)
    Image.new("RGB", (64, 64), (200, 0, 0)).save(root / "my-photos-2021.png")  # must not match the prefix
    index = root / "index"
    with Indexer.open(index, model="demo") as indexer:
        indexer.index([library, root / "my-photos-2021.png"])
        indexer.add_captions(library / "captions.jsonl", "demo")
    return index, library, pictures


@pytest.fixture(scope="module")
def engine(indexed):
    with SearchEngine.open(indexed[0]) as engine:
        yield engine


def brute_force(engine, vector, modality, k, ids=None):
    all_ids, vectors = engine.store.catalog.vectors(modality)
    keep = np.isin(all_ids, ids) if ids is not None else np.ones(len(all_ids), bool)
    scores = vectors[keep] @ vector
    order = np.argsort(-scores, kind="stable")[:k]
    return all_ids[keep][order], scores[order]


def test_exact_search_equals_numpy_brute_force(engine):
    rng = np.random.default_rng(0)
    for modality in ("image", "text"):
        for _ in range(20):
            vector = rng.normal(size=64).astype(np.float32)
            hits = engine.search(Query.vector(vector), k=7, modality=modality)
            ids, scores = brute_force(engine, vector / np.linalg.norm(vector), modality, 7)
            assert [hit.id for hit in hits] == list(ids)
            np.testing.assert_allclose([hit.score for hit in hits], scores, atol=1e-5)
            assert all(hit.modality == modality for hit in hits)


def test_filtered_search_equals_brute_force_over_the_matching_items(engine, indexed):
    _, library, _ = indexed
    rng = np.random.default_rng(1)
    catalog = engine.store.catalog
    images = {row.id: row for row in catalog.items_by_id(list(catalog.vectors("image")[0])).values()}
    cases = {
        "prefix": (dict(path=str(library / "album-01")), lambda row: row.display.startswith(f"{library}/album-01/")),
        "escaped prefix": (dict(path=str(library)), lambda row: row.display.startswith(f"{library}/")),
        "glob": (dict(path="*/grass/*.png"), lambda row: "/grass/" in row.display and row.display.endswith(".png")),
        "dates": (
            dict(date_from="2020-01-01", date_to="2999-12-31"),
            lambda row: True,
        ),
    }
    for name, (filters, matches) in cases.items():
        expected_ids = [i for i, row in images.items() if matches(row)]
        assert expected_ids, name
        for _ in range(5):
            vector = rng.normal(size=64).astype(np.float32)
            hits = engine.search(Query.vector(vector), k=10, **filters)
            ids, _ = brute_force(engine, vector / np.linalg.norm(vector), "image", 10, expected_ids)
            assert [hit.id for hit in hits] == list(ids), name
    # The folder "my_photos%2021" must not match "my-photos-2021.png": % and _ are literal.
    assert all("my-photos" not in hit.path for hit in engine.search("a red square", k=200, path=str(library)))
    assert engine.search("a red square", date_to="1999-01-01") == []


def test_paging_min_score_and_k_cap(engine):
    first = engine.search("a large red circle", k=10)
    assert engine.search("a large red circle", k=5, offset=5) == first[5:]
    scores = [hit.score for hit in first]
    assert scores == sorted(scores, reverse=True)
    above = engine.search("a large red circle", k=10, min_score=scores[3])
    assert above == first[:4]
    assert len(engine.search("a large red circle", k=MAX_K * 10)) == 121  # capped, then all there are


def test_hits_are_typed_and_json_serialisable(engine, indexed):
    import json

    hit = engine.search("a blue star", k=1)[0]
    assert isinstance(hit, Hit) and hit.modality == "image" and os.path.exists(hit.path)
    assert set(hit.metadata) == {"width", "height", "taken_at", "size"}
    text = engine.search("a blue star", k=1, modality="text")[0]
    assert text.collection == "demo" and text.metadata["image"].endswith((".jpg", ".png"))
    assert json.loads(json.dumps(text.to_dict()))["caption"] == text.caption


def test_queries_by_text_image_bytes_item_and_combinations(engine, indexed):
    _, library, pictures = indexed
    picture = library / pictures[0].path
    by_path = engine.search(Query.image(picture), k=1)[0]
    assert by_path.path == str(picture)
    assert engine.search(picture.read_bytes(), k=1)[0].id == by_path.id
    with Image.open(picture) as image:
        assert engine.search(image, k=1)[0].id == by_path.id
    assert engine.search(by_path.id, k=1)[0].id == by_path.id
    mixed = engine.embed(Query.text("a red circle") + Query.image(picture) - 0.5 * Query.text("grass"))
    parts = [engine.embed(q) for q in ("a red circle", Query.image(picture), "grass")]
    expected = parts[0] + parts[1] - 0.5 * parts[2]
    np.testing.assert_allclose(mixed, expected / np.linalg.norm(expected), atol=1e-5)


@pytest.mark.parametrize(
    ("query", "options", "message"),
    [
        ("", {}, "empty query"),
        (Query(), {}, "empty query"),
        ("x", {"k": 0}, "k must be at least 1"),
        ("x", {"collection": "nope"}, "no collection 'nope'"),
        ("x", {"modality": "audio"}, "modality must be"),
        (10**9, {}, "no item"),
        (b"not a picture", {}, "cannot read the query image"),
        (Path("/nowhere.jpg"), {}, "cannot read /nowhere.jpg"),
        (Query.text("dog") - Query.text("dog"), {}, "cancel out"),
        ("x", {"date_from": "yesterday"}, "not a date"),
    ],
)
def test_bad_queries_are_clear_errors(engine, query, options, message):
    with pytest.raises(QueryError, match=message):
        engine.search(query, **options)


def test_missing_index_and_unloadable_model(tmp_path, monkeypatch):
    with pytest.raises(IndexNotFoundError, match="no index at"):
        SearchEngine.open(tmp_path / "nowhere")
    from indexer.models.identity import demo_checkpoint

    checkpoint = tmp_path / "moved.safetensors"
    checkpoint.write_bytes(demo_checkpoint().read_bytes())
    write_library(tmp_path / "library", count=2)
    with Indexer.open(tmp_path / "index", model="demo", checkpoint=checkpoint) as indexer:
        indexer.index([tmp_path / "library"])
    checkpoint.unlink()
    with SearchEngine.open(tmp_path / "index") as engine:
        assert len(engine.search("a red circle", k=2)) == 2  # through the ONNX export, which needs no weights
    monkeypatch.setenv("CLIPSEEK_BACKEND", "torch")
    with SearchEngine.open(tmp_path / "index") as engine, pytest.raises(ModelError, match="does not exist any more"):
        engine.search("a red circle")


def test_one_engine_serves_many_threads(engine):
    queries = ["a red circle", "a blue star", "a large green cross", "a small white square"] * 4
    expected = {q: engine.search(q, k=5) for q in set(queries)}
    results, errors = {}, []

    def ask(number, query):
        try:
            results[number] = engine.search(query, k=5)
        except Exception as error:  # collected and reported below
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(n, q)) for n, q in enumerate(queries)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert all(results[n] == expected[q] for n, q in enumerate(queries))


def test_an_open_engine_sees_new_commits(tmp_path):
    write_library(tmp_path / "first", count=5, seed=1)
    write_library(tmp_path / "second", count=5, seed=2)
    with Indexer.open(tmp_path / "index", model="demo") as indexer:
        indexer.index([tmp_path / "first"])
    with SearchEngine.open(tmp_path / "index") as engine:
        assert len(engine.search("a circle", k=100)) == 5
        with Indexer.open(tmp_path / "index") as indexer:
            indexer.index([tmp_path / "second"])
        assert len(engine.search("a circle", k=100)) == 10


def test_near_duplicates_of_a_reencoded_resized_copy(tmp_path, engine, indexed):
    _, library, pictures = indexed
    original = library / pictures[3].path
    copy = io.BytesIO()
    with Image.open(original) as image:
        image.convert("RGB").resize((150, 150)).save(copy, format="JPEG", quality=70)
    found = engine.similar(copy.getvalue(), threshold=0.9)
    assert found and found[0].path == str(original)
    item = engine.search(Query.image(original), k=1)[0].id
    assert all(hit.id != item for hit in engine.similar(item, threshold=0.5))


def test_classify_gives_probabilities_from_the_model(engine, indexed):
    _, library, pictures = indexed
    results = engine.classify([library / p.path for p in pictures[:3]], ["circle", "square", "star"], "a {}")
    for probabilities in results:
        assert list(probabilities) == sorted(probabilities, key=probabilities.get, reverse=True)
        assert abs(sum(probabilities.values()) - 1) < 1e-5
    with pytest.raises(QueryError, match="at least two labels"):
        engine.classify([library / pictures[0].path], ["circle", " "])
