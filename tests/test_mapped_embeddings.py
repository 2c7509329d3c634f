"""Re-ranking from the memory-mapped embeddings (image.embeddings) on real catalogs and FAISS files:
the same hits and true float32 scores as re-ranking from the catalog, in float32 and float16; a
damaged, truncated or half-written file never served and rebuilt by the next writing command;
items added since it was built found with exact scores; removed items never returned."""

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from indexer.store import NewImage, Store
from indexer.store import embedding_file as files
from tests.test_index_types import make_index, unit

QUIET = {"progress": lambda *_: None}


def stamp_of(root: Path) -> dict:
    return json.loads((root / "image.embeddings.stamp").read_bytes())


def answers(root: Path, queries: np.ndarray, k: int = 10) -> list[tuple[list[int], list[float]]]:
    """What a fresh reader answers for each query: (ids, scores)."""
    with Store.open(root) as store:
        return [tuple(map(list, store.nearest("image", query, k))) for query in queries]


def from_the_catalog(root: Path, queries: np.ndarray, k: int = 10) -> list[tuple[list[int], list[float]]]:
    """The same, with the embeddings file set aside: re-ranked from the catalog (the reference)."""
    aside = root / "aside"
    (root / "image.embeddings").rename(aside)
    try:
        return answers(root, queries, k)
    finally:
        aside.rename(root / "image.embeddings")


def exact(root: Path, query: np.ndarray, k: int = 10) -> tuple[list[int], np.ndarray]:
    with Store.open(root) as store:
        ids, vectors = store.catalog.vectors("image")
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return list(ids[order]), scores[order]


def add_near(root: Path, query: np.ndarray, count: int, seed: int) -> list[int]:
    """`count` pictures next to `query`, added through a writer as an index run adds them."""
    rng = np.random.default_rng(seed)
    vectors = unit(query + 0.002 * rng.normal(size=(count, len(query))))
    with Store.open(root, write=True) as store:
        with store.write() as writer:
            ids = writer.add_images(
                [
                    NewImage(f"/new/{seed}-{n}.jpg".encode(), 1, 1, f"{seed}-{n}", 1, 1, "", v)
                    for n, v in enumerate(vectors)
                ]
            )
        store.catch_up()
    return ids


@pytest.fixture(scope="module")
def planted():
    return unit(np.random.default_rng(99).normal(size=(12, 64)))


@pytest.fixture
def ivf(tmp_path, planted):
    root = tmp_path / "index"
    make_index(root, 4000, planted)
    with Store.open(root, write=True) as store:
        store.optimize("ivf", **QUIET)
    return root


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_the_mapped_file_gives_the_catalogs_hits_and_scores(tmp_path, planted, kind):
    root = tmp_path / "index"
    make_index(root, 4000, planted)
    with Store.open(root, write=True) as store:
        store.optimize(kind, **QUIET)
        assert "re-ranked from image.embeddings (float32" in store.status().index_type
    queries = np.concatenate([planted, unit(np.random.default_rng(5).normal(size=(20, planted.shape[1])))])
    mapped = answers(root, queries)
    assert mapped == from_the_catalog(root, queries)  # the same ids, in the same order, with the same scores
    for number, (ids, scores) in enumerate(mapped[: len(planted)]):
        expected, exact_scores = exact(root, planted[number])
        assert ids == expected and set(ids) == set(range(10 * number + 1, 10 * number + 11))
        np.testing.assert_allclose(scores, exact_scores, rtol=0, atol=1e-6)


def test_a_small_memory_budget_maps_float16_and_still_returns_true_float32_scores(tmp_path, planted):
    root = tmp_path / "index"
    make_index(root, 4000, planted)
    # 4,120 vectors of 64-d as ivf take 1.04 MiB; their float32 copy 1.01 MiB more, float16 half that.
    with Store.open(root, write=True) as store:
        _, budget, _ = store.index_setting(budget=int(1.5 * 2**20))  # as `optimize --memory-budget 1.5M` does
        store.optimize("ivf", budget=budget, **QUIET)
        assert "re-ranked from image.embeddings (float16, 1 MiB mapped, beyond the memory budget)" in (
            store.status().index_type
        )
        store.index_setting(budget=int(1.65 * 2**20))  # the same file, now within the budget
        assert "re-ranked from image.embeddings (float16, 1 MiB mapped)" in store.status().index_type
    assert stamp_of(root)["dtype"] == "float16"
    queries = np.concatenate([planted, unit(np.random.default_rng(6).normal(size=(40, planted.shape[1])))])
    assert answers(root, queries) == from_the_catalog(root, queries)


def test_a_damaged_row_is_never_served_and_the_next_writing_command_rebuilds_the_file(ivf, planted, caplog):
    root = ivf
    query = planted[1:2]  # its true neighbours are items 11 to 20
    before = answers(root, query)
    stamp = stamp_of(root)
    ids = np.fromfile(root / "image.embeddings", "<i8", offset=stamp["size"] - 8 * stamp["count"])
    with open(root / "image.embeddings", "r+b") as file:  # item 11's row, as a bad sector leaves it
        file.seek(int(np.searchsorted(ids, 11)) * (4 * stamp["dim"] + 8) + 8)  # records: vector, 8-byte check
        file.write(b"\x7f" * 16)  # floats of 3.4e38: served, they would top every search
    with caplog.at_level(logging.INFO, logger="clipseek"):
        assert answers(root, query) == before  # re-ranked from the catalog instead
    damaged = "image.embeddings: damaged (the row of item 11 fails its checksum)"
    assert f"{damaged}; re-ranking from the catalog" in caplog.text
    with Store.open(root) as store:
        [problem] = store.check()
        assert problem.startswith("image.embeddings: damaged (its content's checksum is ")
    with Store.open(root, write=True) as store:
        store.catch_up()  # what every writing command ends with
        assert store.check() == []
    assert stamp_of(root)["nonce"] != stamp["nonce"] and answers(root, query) == before


@pytest.mark.parametrize("damage", ["truncated", "newer than the catalog", "not stamped", "of an older format"])
def test_a_truncated_or_unstamped_file_is_never_opened_and_is_rebuilt(ivf, planted, damage, caplog):
    root = ivf
    before = answers(root, planted)
    path = root / "image.embeddings"
    if damage == "truncated":
        with open(path, "r+b") as file:
            file.truncate(path.stat().st_size - 8)
    elif damage == "newer than the catalog":  # a catalog restored from an older backup
        (root / "image.embeddings.stamp").write_text(json.dumps({**stamp_of(root), "generation": 10**6}))
    elif damage == "of an older format":  # stamps of files whose rows carried CRC-32s lack the field
        old = {key: value for key, value in stamp_of(root).items() if key != "row_check"}
        (root / "image.embeddings.stamp").write_text(json.dumps(old))
    else:
        (root / "image.embeddings.stamp").unlink()
    with caplog.at_level(logging.INFO, logger="clipseek"):
        assert answers(root, planted) == before
    assert f"image.embeddings: {damage}" in caplog.text
    with Store.open(root, write=True) as store:
        store.catch_up()
        assert store.check() == []
    assert answers(root, planted) == before


def test_a_crash_between_the_file_and_its_stamp_reopens_consistent(ivf, planted, caplog):
    """A kill after the new file is renamed into place and before its stamp is written leaves the
    new file under the old stamp (and perhaps a half-written temporary file): reproduced exactly."""
    root = ivf
    before = answers(root, planted)
    old_stamp = (root / "image.embeddings.stamp").read_bytes()
    with Store.open(root) as store:
        files.write(root / "image.embeddings", store.catalog.vector_blocks("image", 1000), 64, "float32", 1)
    (root / "image.embeddings.stamp").write_bytes(old_stamp)  # the same size: only the nonce tells them apart
    (root / "image.embeddings.tmp").write_bytes(b"half a file")
    with caplog.at_level(logging.INFO, logger="clipseek"):
        assert answers(root, planted) == before
    assert "image.embeddings: damaged" in caplog.text
    with Store.open(root, write=True) as store:
        store.catch_up()
        assert store.check() == []
    assert answers(root, planted) == before
    with Store.open(root) as store:
        assert "re-ranked from image.embeddings (float32" in store.status().index_type


def test_items_added_after_the_build_are_found_with_exact_scores(ivf, planted):
    root = ivf
    built = stamp_of(root)
    query = planted[0]
    added = add_near(root, query, 12, seed=1)  # nearer to it than its ten planted neighbours
    assert stamp_of(root) == built  # 12 new of 4,120: re-ranked from the catalog, the file kept
    ids, scores = answers(root, query[None, :])[0]
    expected, exact_scores = exact(root, query)
    assert set(ids) <= set(added) and ids == expected
    np.testing.assert_allclose(scores, np.clip(exact_scores, -1, 1), rtol=0, atol=1e-6)
    assert answers(root, planted) == from_the_catalog(root, planted)
    other = unit(np.random.default_rng(8).normal(size=(1, 64)))[0]
    more = add_near(root, other, 500, seed=2)
    assert stamp_of(root)["count"] == built["count"] + 512  # past a tenth lacking: rebuilt
    ids, _ = answers(root, other[None, :])[0]
    assert set(ids) <= set(more)


def test_removed_items_are_never_returned(ivf, planted):
    root = ivf
    with Store.open(root, write=True) as writer:
        writer.remove(["/photos/000000.jpg", "/photos/000001.jpg"])
    assert stamp_of(root)["count"] == 4120  # the file still holds them
    found = answers(root, planted[:1])[0][0]
    assert not {1, 2} & set(found) and len(found) == 10


def test_a_reader_that_has_not_seen_a_removal_drops_the_removed_items_when_re_scoring_float16(tmp_path, planted):
    """From float16, the hits are re-scored from the catalog, which no longer has them. (From float32,
    as from an exact index, such a reader's hits may name them until it refreshes: the engine
    refreshes before each search and drops ids the catalog lacks.)"""
    root = tmp_path / "index"
    make_index(root, 4000, planted)
    with Store.open(root, write=True) as store:
        _, budget, _ = store.index_setting(budget=int(1.5 * 2**20))
        store.optimize("ivf", budget=budget, **QUIET)
    with Store.open(root) as reader:
        first, _ = reader.nearest("image", planted[0], 10)
        assert sorted(first) == list(range(1, 11))  # the planted neighbours
        with Store.open(root, write=True) as writer:
            writer.remove(["/photos/000000.jpg", "/photos/000001.jpg"])
        found, _ = reader.nearest("image", planted[0], 10)  # its vector index is from before
        assert not {1, 2} & set(found) and len(found) == 10


def test_an_index_turned_exact_keeps_no_embeddings_file(ivf, planted):
    root = ivf
    with Store.open(root, write=True) as store:
        store.optimize("flat", **QUIET)
        assert "re-ranked" not in store.status().index_type and store.check() == []
    assert not (root / "image.embeddings").exists() and not (root / "image.embeddings.stamp").exists()
    with Store.open(root, write=True) as store:
        store.optimize("hnsw", **QUIET)
    assert stamp_of(root)["count"] == 4120 and answers(root, planted) == from_the_catalog(root, planted)


@pytest.mark.parametrize(
    "spacing",
    ["one modality", "two interleaved", "runs with gaps", "random gaps"],
)
def test_each_row_is_found_by_its_id_however_the_ids_are_spaced(tmp_path, spacing):
    """Rows are looked up by guessing from the ids' spacing: whatever the ids, every id held is
    found with its own vector and no other id is; each float16 row's score lies within the file's
    error bound of its float32 vector's (values below float16's normal range too)."""
    rng = np.random.default_rng(7)
    ids = {
        "one modality": np.arange(1, 3001),
        "two interleaved": np.arange(2, 6001, 2),
        "runs with gaps": np.concatenate([np.arange(1, 1001), np.arange(5000, 6000), np.arange(90_000, 91_000)]),
        "random gaps": np.sort(rng.choice(100_000, 3000, replace=False)) + 1,
    }[spacing]
    vectors = unit(rng.normal(size=(len(ids), 16))).astype(np.float32)
    vectors[:, 0] = rng.choice([0.0, 3e-6, -2e-7, 6e-5], len(ids))  # float16 subnormals and zero
    path = tmp_path / "image.embeddings"
    files.write(path, [(ids[:1500], vectors[:1500]), (ids[1500:], vectors[1500:])], 16, "float16", 1)
    mapped, problem = files.EmbeddingFile.open(path, 16, 1)
    assert problem == ""
    asked = np.concatenate([ids[rng.permutation(len(ids))[:500]], rng.integers(0, ids[-1] + 100, 500)])
    rows, held = mapped.find(asked)
    assert np.array_equal(held, np.isin(asked, ids))
    position = {int(item): row for row, item in enumerate(ids)}
    assert rows.tolist() == [position[int(item)] for item in asked[held]]
    np.testing.assert_array_equal(mapped.rows(rows, asked[held]), vectors[rows].astype(np.float16).astype(np.float32))
    query = unit(rng.normal(size=(1, 16)))[0].astype(np.float32)
    error = np.abs(mapped.scores(rows, asked[held], query) - vectors[rows].astype(np.float64) @ query)
    assert error.max() <= mapped.error_bound(query) and error.max() > 0


@pytest.mark.parametrize(("dim", "dtype"), [(64, "float32"), (13, "float16")])
def test_a_rows_check_catches_every_flipped_bit_and_the_row_of_another_item(dim, dtype):
    """Every single-bit change of a row, in a whole 8-byte word or in the odd bytes after the
    last one (13 float16s: 26 bytes), and a row read for another id, fail the check; so does
    a row checked with another build's keys."""
    rng = np.random.default_rng(4)
    rows = unit(rng.normal(size=(3, dim))).astype(dtype)
    ids = np.array([7, 8, 9])
    keys = files.row_keys(12345, files._words(rows[0].nbytes))
    checks = files.row_checks(rows, ids, keys)
    assert np.array_equal(files.row_checks(rows[::-1], ids[::-1], keys), checks[::-1])
    data = rows[1].view(np.uint8)
    for byte in range(len(data)):
        for bit in range(8):
            flipped = rows.copy()
            flipped[1].view(np.uint8)[byte] ^= 1 << bit
            assert files.row_checks(flipped, ids, keys)[1] != checks[1], (byte, bit)
    assert files.row_checks(rows, np.array([7, 9, 8]), keys)[1] != checks[1]
    assert not np.any(files.row_checks(rows, ids, files.row_keys(12346, len(keys) - 2)) == checks)


def test_a_few_embeddings_read_at_once_are_the_catalogs_in_the_order_asked(ivf):
    """The near-ties' rows are read on several connections at once: the same rows as read one by
    one, in the order asked, without the ids that are not there; the threads end with the store."""
    rng = np.random.default_rng(3)
    with Store.open(ivf) as store:
        for count in (2, 3, 12, 64):
            asked = np.concatenate([rng.choice(4120, count - 1, replace=False) + 1, [999_999]])
            rng.shuffle(asked)
            ids, vectors = store.catalog.embeddings_of(asked)
            assert ids.tolist() == [int(i) for i in asked if i != 999_999]
            for item, vector in zip(ids, vectors, strict=True):
                np.testing.assert_array_equal(vector, store.catalog.embedding(int(item)))
        assert any(thread.name.startswith("clipseek-catalog") for thread in threading.enumerate())
    assert not any(thread.name.startswith("clipseek-catalog") for thread in threading.enumerate())


def mappings_of(path: Path) -> set[tuple[str, int]]:
    """This process's mappings of `path`: (address range, inode), from /proc/self/maps."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {(line.split()[0], int(line.split()[4])) for line in lines if line.endswith(str(path))}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_a_warm_reader_keeps_its_mapping_across_commits_and_maps_a_rebuilt_file_anew(ivf, planted):
    """A server warms the file once (its pages read and mapped); another process's commit that
    leaves the file as it is does not make the reader map it again, and a rebuild does."""
    root, path = ivf, ivf / "image.embeddings"
    other = unit(np.random.default_rng(8).normal(size=(1, 64)))[0]
    with Store.open(root) as reader:
        reader.reranking.warm()
        warmed = mappings_of(path)
        assert len(warmed) == 1 and next(iter(warmed))[1] == path.stat().st_ino
        added = add_near(root, planted[0], 12, seed=1)  # the file kept
        reader.refresh()
        ids, _ = reader.nearest("image", planted[0], 10)
        assert set(ids) <= set(added) and mappings_of(path) == warmed
        more = add_near(root, other, 500, seed=2)  # the file rebuilt
        reader.refresh()
        ids, _ = reader.nearest("image", other, 10)
        assert set(ids) <= set(more)
        assert path.stat().st_ino in {inode for _, inode in mappings_of(path)}
