"""Approximate index kinds on real catalogs and FAISS files: exact top-k after re-ranking, filters
that still give k hits, optimize switching kinds without losing an item, and the automatic choice."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from indexer.errors import StoreError
from indexer.models.identity import ModelId
from indexer.store import NewImage, Store
from indexer.store.index_choice import DEFAULT_LATENCY_MS, choose, parse_latency, parse_size
from indexer.store.vectors import GRAPH_QUANTIZER_NLIST, KINDS, IndexSpec, TuningQueries, VectorIndex, exact_top
from search.cli.index_commands import INDEX_TYPES

DIM = 64
MODEL = ModelId("demo", None, "0" * 64, DIM, 64)
CLIPSEEK = str(Path(sys.executable).parent / "clipseek")


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def make_index(root: Path, count: int, planted: np.ndarray, seed: int = 0) -> np.ndarray:
    """`count` clustered vectors, and ten near copies of each planted query (their true top 10); the ids."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, DIM))
    background = unit(centres[rng.integers(0, 50, count)] + 0.6 * rng.normal(size=(count, DIM)))
    near = unit(np.repeat(planted, 10, axis=0) + 0.01 * rng.normal(size=(10 * len(planted), DIM)))
    vectors = np.concatenate([near, background])
    with Store.open(root, write=True, create=True) as store:
        store.claim_model(MODEL, None)
        with store.write() as writer:
            ids = writer.add_images(
                [
                    NewImage(f"/photos/{n:06d}.jpg".encode(), 1, 1, f"{n:064x}", 1, 1, "", vector)
                    for n, vector in enumerate(vectors)
                ]
            )
    return np.asarray(ids)


@pytest.fixture(scope="module")
def planted():
    return unit(np.random.default_rng(99).normal(size=(12, DIM)))


@pytest.fixture
def index(tmp_path, planted):
    ids = make_index(tmp_path / "index", 4000, planted)
    return tmp_path / "index", ids


def brute_force(store: Store, query: np.ndarray, k: int, allowed=None):
    ids, vectors = store.catalog.vectors("image")
    keep = np.isin(ids, allowed) if allowed is not None else np.ones(len(ids), bool)
    scores = vectors[keep] @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return ids[keep][order], scores[order]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_returns_the_exact_top_k_with_true_scores(index, planted, kind):
    root, ids = index
    with Store.open(root, write=True) as store:
        spec = store.optimize(kind, progress=lambda *_: None)["image"]
        assert spec.kind == kind and (spec.exact or spec.recall >= 0.95)
    with Store.open(root) as store:
        assert store.vectors("image").spec.kind == kind  # read back from the file
        for number, query in enumerate(planted):
            found, scores = store.nearest("image", query, 10)
            assert set(found) == set(ids[10 * number : 10 * number + 10])
            expected, exact = brute_force(store, query, 10)
            assert list(found) == list(expected)
            np.testing.assert_allclose(scores, exact, atol=1e-6)  # true cosines, even from PQ codes


@pytest.mark.parametrize("kind", KINDS)
def test_filters_still_give_k_hits_with_every_kind(index, planted, kind):
    root, ids = index
    rng = np.random.default_rng(3)
    with Store.open(root, write=True) as store:
        store.optimize(kind, progress=lambda *_: None)
    with Store.open(root) as store:
        for size in (12, 300):  # a narrow filter, and a wider one
            allowed = np.sort(rng.choice(ids, size, replace=False))
            for query in planted[:4]:
                found, scores = store.nearest("image", query, 10, allowed)
                expected, exact = brute_force(store, query, 10, allowed)
                assert len(found) == 10 and set(found) <= set(allowed)
                assert list(found) == list(expected)
                np.testing.assert_allclose(scores, exact, atol=1e-6)


def test_switching_kinds_keeps_every_item_findable_and_the_files_consistent(index):
    root, ids = index
    sample = np.random.default_rng(4).choice(ids[100:], 100, replace=False)
    for number, kind in enumerate(("ivf", "hnsw", "ivfpq", "flat")):
        with Store.open(root, write=True) as store:
            store.optimize(kind, progress=lambda *_: None)
        with Store.open(root, write=True) as store:
            assert store.check() == []
            for item in sample:
                found, _ = store.nearest("image", store.catalog.embedding(int(item)), 1)
                assert found[0] == item
            assert store.remove([f"/photos/{number:06d}.jpg"]) == 1  # works with every kind (hnsw: a rebuild)
            assert store.check() == [] and store.vectors("image").count == len(ids) - number - 1


def test_a_rebuilt_vector_file_is_of_the_kind_chosen_last(index):
    root, _ = index
    with Store.open(root, write=True) as store:
        store.optimize("ivf", progress=lambda *_: None)
    (root / "image.faiss").unlink()  # lost: rebuilt from the catalog, as the same kind
    with Store.open(root) as store:
        rebuilt = store.vectors("image").spec
        assert rebuilt.kind == "ivf" and rebuilt.recall >= 0.95


def run(*args):
    return subprocess.run([CLIPSEEK, *map(str, args)], capture_output=True, text=True)


def test_an_interrupted_optimize_leaves_the_old_files_serving(tmp_path, planted):
    root = tmp_path / "index"
    make_index(root, 30_000, planted)
    assert run("optimize", "--index", root, "--index-type", "ivf").returncode == 0
    before = run("search", "--item", 20, "--index", root, "-k", "5", "--json").stdout
    optimize = subprocess.Popen(
        [CLIPSEEK, "optimize", "--index", root, "--index-type", "ivfpq"], stderr=subprocess.PIPE, text=True
    )
    assert "training ivfpq" in optimize.stderr.readline()  # killed while it builds (PQ training takes seconds)
    time.sleep(0.5)
    optimize.send_signal(signal.SIGKILL)
    optimize.wait()
    assert run("check", "--index", root).returncode == 0
    status = json.loads(run("status", "--index", root, "--json").stdout)
    assert status["index_type"].startswith("images ivf (")
    assert run("search", "--item", 20, "--index", root, "-k", "5", "--json").stdout == before


def test_the_cli_remembers_the_index_type_and_status_shows_it(index):
    root, _ = index
    chosen = run("optimize", "--index", root, "--index-type", "hnsw", "--memory-budget", "1G")
    assert chosen.returncode == 0 and chosen.stdout.startswith("images: hnsw (M 32, efSearch ")
    phases = ["images: building hnsw", "images: adding 4,120 vectors", "images: tuning to recall@10 ≥ 0.95"]
    assert chosen.stderr.splitlines() == phases  # lines, as stderr is no terminal here
    status = run("status", "--index", root).stdout
    assert "search     images hnsw (M 32, efSearch " in status and "recall@10" in status
    again = run("optimize", "--index", root)  # the remembered setting
    assert again.stdout.startswith("images: hnsw")
    bad = run("optimize", "--index", root, "--memory-budget", "lots")
    assert bad.returncode == 1 and "a memory budget is a size like 4G" in bad.stderr
    small = run("optimize", "--index", root, "--index-type", "flat", "--memory-budget", "100k")
    assert small.returncode == 1 and "over the memory budget" in small.stderr and "Traceback" not in small.stderr


def test_auto_decides_by_the_latency_budget_remembers_it_and_keeps_exact_answers(index, planted):
    root, _ = index  # 4,120 vectors of 64 dimensions: one exact search takes well under a millisecond
    fast = run("optimize", "--index", root, "--latency-budget", "1s")
    assert fast.stdout.startswith("images: flat (exact search); exact search of 4,120 took ")
    assert "within the 1000 ms budget" in fast.stdout
    slow = run("optimize", "--index", root, "--latency-budget", "0.001ms")
    assert slow.stdout.startswith("images: ivf (") and "over the 0.001 ms budget" in slow.stdout
    assert "over the 0.001 ms budget" in run("status", "--index", root).stdout
    with Store.open(root, write=True) as store:
        assert store.index_setting() == ("auto", 4 << 30, 0.001)  # remembered
        assert store.fit() == {}  # the next write keeps the kind it chose
        spec = store.vectors("image").spec
        assert spec.kind == "ivf" and spec.recall >= spec.target == 0.95
        for query in planted:  # re-ranked: the exact neighbours and their true scores
            ids, scores = store.nearest("image", query, 10)
            expected, true_scores = brute_force(store, query, 10)
            assert np.array_equal(ids, expected) and np.allclose(scores, true_scores)
        store.index_setting(latency_ms=1000.0)
        assert store.fit()["image"].kind == "flat"  # a faster machine, or a looser budget: exact again
    bad = run("optimize", "--index", root, "--latency-budget", "soon")
    assert bad.returncode == 1 and "a latency budget is a time like 10ms" in bad.stderr


def test_auto_keeps_exact_search_within_the_latency_budget_then_clusters_then_compresses():
    gib, slow = 2**30, 1000.0  # exact search times given, as measured on a slow machine
    assert choose(300_000, 512, exact_ms=9.0)[0].kind == "flat"  # within the default 10 ms
    spec, decision = choose(300_000, 512, exact_ms=12.0)
    assert spec.kind == "ivf" and spec.target == 0.99  # nearly fast enough: the switch must not show
    assert decision.describe() == "exact search of 300,000 took 12.0 ms here, over the 10 ms budget"
    assert choose(300_000, 512, exact_ms=60.0)[0].target == 0.95
    assert choose(300_000, 512, exact_ms=9.0, current="ivf")[0].kind == "ivf"  # timing noise changes nothing
    assert choose(300_000, 512, exact_ms=7.0, current="ivf")[0].kind == "flat"  # a faster machine
    assert choose(1_000_000, 512, exact_ms=slow)[0].kind == "ivf"  # 2 GiB of full vectors fit the default 4 GiB
    compressed, _ = choose(10_000_000, 512, budget=4 * gib, exact_ms=slow)
    assert compressed.kind == "ivfpq" and compressed.code_bytes == 64
    assert choose(100_000_000, 512, budget=16 * gib, exact_ms=slow)[0].code_bytes == 64  # 72-byte entries
    with pytest.raises(StoreError, match="over the memory budget"):
        choose(1_000_000_000, 512, budget=4 * gib, exact_ms=slow)
    with pytest.raises(StoreError, match="needs at least"):
        choose(100, 512, "ivf")
    assert choose(500, 512, latency_ms=0.0001)[0].kind == "flat"  # too few vectors to cluster
    assert parse_size("4G") == 4 * gib and parse_size("512M") == 512 * 2**20 and parse_size("800k") == 800 * 1024
    assert parse_latency("10ms") == parse_latency("10") == DEFAULT_LATENCY_MS and parse_latency("0.5s") == 500
    with pytest.raises(StoreError, match="a latency budget is a time"):
        parse_latency("fast")
    assert ("auto", *KINDS) == INDEX_TYPES


def test_fit_rebuilds_what_the_setting_outgrew_and_keeps_what_it_cannot_build(tmp_path, planted):
    small, large = tmp_path / "small", tmp_path / "large"
    make_index(small, 200, planted)
    make_index(large, 4000, planted)
    messages = []
    with Store.open(small, write=True) as store:
        store.index_setting("ivf")
        assert store.fit(progress=lambda phase, *_: messages.append(phase)) == {}
    assert messages == ["images: ivf needs at least 624 vectors to train on; there are 320; the vector file stays flat"]
    with Store.open(large, write=True) as store:
        assert (
            store.fit(progress=lambda phase, *_: messages.append(phase)) == {}
        )  # auto: 4,120 vectors are served best exactly
        store.index_setting("ivf")
        assert store.fit(progress=lambda phase, *_: messages.append(phase))["image"].kind == "ivf"
        assert store.fit(progress=lambda phase, *_: messages.append(phase)) == {}  # fits now: left alone
    with Store.open(large) as store:
        assert (
            store.index_setting() == ("ivf", 4 << 30, DEFAULT_LATENCY_MS) and store.vectors("image").spec.kind == "ivf"
        )


def test_tuning_widens_the_shortlist_when_pq_codes_cannot_order_the_neighbours(tmp_path):
    # Vectors without structure and 8-byte codes (all a 100 kB budget holds): however many clusters
    # are probed, the best 200 by PQ's estimate miss true neighbours, so more are re-ranked.
    rng = np.random.default_rng(5)
    with Store.open(tmp_path / "index", write=True, create=True) as store:
        store.claim_model(MODEL, None)
        with store.write() as writer:
            vectors = unit(rng.normal(size=(6000, DIM)))
            writer.add_images(
                [NewImage(f"/p/{n}.jpg".encode(), 1, 1, f"{n:064x}", 1, 1, "", v) for n, v in enumerate(vectors)]
            )
        spec = store.optimize("ivfpq", 100_000, progress=lambda *_: None)["image"]
        assert spec.code_bytes == 8 and spec.shortlist > 200 and spec.recall >= 0.95
        hits = 0
        for query in unit(rng.normal(size=(50, DIM))):  # fresh queries, not the tuning sample
            found, _ = store.nearest("image", query, 10)
            hits += len(np.intersect1d(found, brute_force(store, query, 10)[0]))
        assert hits / 500 >= 0.9


def test_rebuilds_read_the_catalog_in_blocks_and_gather_the_exact_neighbours(index):
    root, ids = index
    with Store.open(root) as store:
        all_ids, vectors = store.catalog.vectors("image")
        blocks = list(store.catalog.vector_blocks("image", 333))
    assert len(blocks) == 13 and all(len(block_ids) == 333 for block_ids, _ in blocks[:-1])
    assert np.array_equal(np.concatenate([b for b, _ in blocks]), all_ids) and np.array_equal(all_ids, np.sort(ids))
    queries = TuningQueries.drawn(all_ids, vectors, count=30)
    for block_ids, block in blocks:
        queries.update(block_ids, block)
    for own, query, truth in zip(queries.ids, queries.queries, queries.truth(), strict=True):
        rows = exact_top(vectors, query[None], 11)[0]
        assert list(truth) == [i for i in all_ids[rows] if i != own][:10]  # itself left out


def test_a_bulk_load_leaves_the_vector_files_to_fit_and_nothing_stale_is_served(index, planted):
    root, ids = index
    extra = unit(planted[:1] + 0.001 * np.random.default_rng(6).normal(size=(3000, DIM)))
    with Store.open(root, write=True) as store:
        store.index_setting("ivf")
        with store.write(index_vectors=False) as writer:  # the catalog only: no vector file changes
            added = writer.add_images(
                [NewImage(f"/bulk/{n}.jpg".encode(), 1, 1, f"b{n:063x}", 1, 1, "", v) for n, v in enumerate(extra)]
            )
        with Store.open(root) as reader:  # meanwhile: the stale file is not served, a rebuild is
            assert reader.check() and set(reader.nearest("image", planted[0], 10)[0]) <= set(added)
        assert store.fit(progress=lambda *_: None)["image"].kind == "ivf"
        assert store.check() == []
    with Store.open(root) as store:
        assert store.vectors("image").count == len(ids) + len(extra)
        assert set(store.nearest("image", planted[1], 10)[0]) == set(ids[10:20])


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_reader_searches_its_file_in_place_while_a_writer_replaces_it(index, planted, kind):
    """A reader maps the vectors of its file instead of copying them (a cold query's time), and
    keeps serving from them while a writer adds an item and renames a new file into place; the
    reader's next query after that commit finds the new item."""
    root, ids = index
    with Store.open(root, write=True) as store:
        store.optimize(kind, progress=lambda *_: None)
    with Store.open(root) as reader:
        assert reader.vectors("image").mapped
        expected = list(ids[:10])
        assert set(reader.nearest("image", planted[0], 10)[0]) == set(expected)
        new = unit(planted[0][None] + 0.001)
        with Store.open(root, write=True) as writer:
            assert not writer.vectors("image").mapped
            with writer.write() as batch:
                (added,) = batch.add_images([NewImage(b"/photos/new.jpg", 1, 1, "f" * 64, 1, 1, "", new[0])])
            writer.flush()
        assert set(reader.nearest("image", planted[0], 10)[0]) == set(expected)  # what it mapped, still whole
        reader.refresh()
        assert added in reader.nearest("image", planted[0], 10)[0]


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_faiss_threads_sleep_when_idle_unless_the_user_says_otherwise(given, expected):
    """FAISS's OpenMP threads spinning between parallel sections took the cores that decoding
    and other queries needed: clipseek asks them to sleep, before FAISS loads, unless the user
    chose a wait policy."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    env |= {"OMP_WAIT_POLICY": given} if given else {}
    code = "from indexer.store import vectors; import os; print(os.environ['OMP_WAIT_POLICY'])"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == expected


def test_many_clusters_are_found_through_a_graph_kept_in_the_file(tmp_path):
    """From GRAPH_QUANTIZER_NLIST clusters on, a query's nearest clusters come from an HNSW graph
    over the centroids: saved with the index, and finding the true neighbours as the clusters'
    flat scan does (here: all the hits an exact search finds, for vectors near the queries)."""
    import faiss  # the quantizer's type is the point here; clipseek's own modules keep faiss in vectors.py

    rng = np.random.default_rng(11)
    queries = unit(rng.normal(size=(20, DIM)))
    near = unit(np.repeat(queries, 10, axis=0) + 0.05 * rng.normal(size=(200, DIM)))
    vectors = np.concatenate([near, unit(rng.normal(size=(8000, DIM)))])
    ids = np.arange(1, len(vectors) + 1)
    built = VectorIndex.build(DIM, ids, vectors, IndexSpec("ivf", nlist=GRAPH_QUANTIZER_NLIST, nprobe=16))
    built.save(tmp_path / "image.faiss", 1)
    loaded, problem = VectorIndex.load(tmp_path / "image.faiss", 0, 1)
    assert problem == "" and isinstance(faiss.downcast_index(loaded.index.quantizer), faiss.IndexHNSWFlat)
    _, found = loaded.search(queries, 200)
    for number, row in enumerate(found):
        assert set(range(10 * number + 1, 10 * number + 11)) <= set(row)
