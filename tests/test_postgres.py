"""The two catalog back ends, SQLite and PostgreSQL (a real server: tests/postgres_server.py), under
the same commands; and what only PostgreSQL allows: several writers at once, without duplicates,
and readers elsewhere following their commits."""

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from indexer.demo_world import write_library
from indexer.errors import IndexNotFoundError, StoreError
from indexer.store import NewImage, Store
from tests.command_line import CLIPSEEK, clipseek


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPSEEK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def image_rows(place: str) -> tuple[int, int]:
    """(picture rows, distinct picture paths) in the catalog at `place`, read directly."""
    query = "SELECT count(*), count(DISTINCT path) FROM items WHERE modality = 'image'"
    if place.startswith("postgresql://"):
        import psycopg

        try:
            with psycopg.connect(place, connect_timeout=5) as connection:
                return connection.execute(query).fetchone()
        except psycopg.errors.UndefinedTable:
            return 0, 0
    try:
        with sqlite3.connect(f"file:{Path(place) / 'catalog.sqlite'}?mode=ro", uri=True) as connection:
            return connection.execute(query).fetchone()
    except sqlite3.Error:
        return 0, 0


def test_every_command_works_the_same_on_both(tmp_path, home, catalog_place):
    library = tmp_path / "library"
    write_library(library, count=24, seed=7)
    clipseek("index", library, "--model", "demo", "--index", catalog_place)
    clipseek("add-captions", library / "captions.jsonl", "--collection", "demo", "--index", catalog_place)
    status = json.loads(clipseek("status", "--json", "--index", catalog_place).stdout)
    assert status["counts"] == [["image", None, 24], ["text", "demo", 24]]

    hits = clipseek("search", "a large red circle", "-k", "3", "--paths", "--index", catalog_place).stdout.split()
    assert len(hits) == 3 and all(Path(hit).is_file() for hit in hits)
    glob = f"{library}/*/grass/*"
    inside = clipseek("search", "a circle", "-k", "50", "--paths", "--path", glob, "--index", catalog_place)
    grass = sorted(str(p) for p in library.glob("*/grass/*"))
    assert grass and sorted(inside.stdout.split()) == grass  # the glob filter, on both back ends
    captions = clipseek("search", "--image", hits[0], "--texts", "-k", "2", "--index", catalog_place).stdout
    assert len(captions.splitlines()) == 2
    similar = clipseek("similar", hits[0], "--threshold", "0.99", "--paths", "--index", catalog_place).stdout
    assert hits[0] in similar.split()

    assert "ok" in clipseek("check", "--index", catalog_place).stderr
    removed = clipseek("remove", library / "album-01" / "grass", "--index", catalog_place).stderr
    left = 24 - len(list((library / "album-01" / "grass").iterdir()))
    assert f"removed {24 - left} items" in removed
    assert image_rows(catalog_place) == (left, left)
    clipseek("check", "--index", catalog_place)


def test_the_catalog_url_names_a_local_folder_of_vector_files_and_no_password(tmp_path, home, postgres, monkeypatch):
    library = tmp_path / "library"
    write_library(library, count=4, seed=1)
    url = postgres.new_database().replace("clipseek@", "clipseek:s3cret@")  # the test server trusts any
    clipseek("index", library, "--model", "demo", "--index", url)
    status = clipseek("status", "--index", url).stdout
    assert "s3cret" not in status and url.replace(":s3cret", "") in status
    assert "image.faiss here: generation" in status and "up to date" in status
    folders = list((home / "indexes").iterdir())
    assert len(folders) == 1 and "s3cret" not in folders[0].name
    assert (folders[0] / "image.faiss").is_file() and not (folders[0] / "catalog.sqlite").exists()
    assert (folders[0] / "catalog.url").read_text().strip() == url.replace(":s3cret", "")
    # That folder's name is a named index whose settings point at the database.
    assert "4 images" in clipseek("status", "--index", folders[0].name).stdout

    # Another machine (a data directory of its own) that only searches keeps vector files of its own.
    monkeypatch.setenv("CLIPSEEK_HOME", str(tmp_path / "elsewhere"))
    assert len(clipseek("search", "a circle", "--paths", "--index", url).stdout.split()) == 4
    (elsewhere,) = (tmp_path / "elsewhere" / "indexes").iterdir()
    assert elsewhere.name == folders[0].name and (elsewhere / "image.faiss").is_file()
    assert "image.faiss here: generation" in clipseek("status", "--index", url).stdout

    empty = clipseek("status", "--index", postgres.new_database(), check=False)
    assert empty.returncode == 1 and "Error: no index in postgresql://" in empty.stderr
    unreachable = clipseek("status", "--index", "postgresql://clipseek:s3cret@127.0.0.1:1/x", check=False)
    assert unreachable.returncode == 1 and "cannot reach the catalog" in unreachable.stderr
    assert "s3cret" not in unreachable.stderr and "Traceback" not in unreachable.stderr


@pytest.mark.slow
def test_a_killed_run_leaves_a_consistent_catalog_and_a_rerun_completes(tmp_path, home, postgres):
    """On PostgreSQL; tests/test_cli_index.py kills runs on SQLite at three points."""
    catalog_place = postgres.new_database()
    library = tmp_path / "library"
    write_library(library, count=200, seed=4)
    command = [CLIPSEEK, "index", library, "--model", "demo", "-q", "--index", catalog_place]
    run = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    while image_rows(catalog_place)[0] < 64 and run.poll() is None:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)

    survived, distinct = image_rows(catalog_place)
    assert survived == distinct and 64 <= survived <= 200
    status = json.loads(clipseek("status", "--json", "--index", catalog_place).stdout)
    assert status["counts"] == [["image", None, survived]]
    rerun = json.loads(clipseek("index", library, "--json", "--index", catalog_place).stdout)
    assert rerun["embedded"] == 200 - survived and rerun["unchanged"] == survived
    assert image_rows(catalog_place) == (200, 200)
    clipseek("check", "--index", catalog_place)


@pytest.mark.slow
def test_concurrent_writers_on_overlapping_paths_store_each_item_once(tmp_path, home, postgres):
    url = postgres.new_database()
    library = tmp_path / "library"
    write_library(library, count=160, seed=5)
    clipseek("index", library / "album-01" / "sand", "--model", "demo", "--index", url)  # the model, once
    runs = [
        subprocess.Popen([CLIPSEEK, "index", folder, "-q", "--json", "--index", url], stdout=subprocess.PIPE, text=True)
        for folder in (library, library, library / "album-01")
    ]
    runs.append(
        subprocess.Popen(
            [CLIPSEEK, "add-captions", library / "captions.jsonl", "--collection", "demo", "--index", url],
            stderr=subprocess.PIPE,
            text=True,
        )
    )
    for run in runs:
        run.wait(timeout=300)
        assert run.returncode == 0, run.stderr and run.stderr.read()
    assert image_rows(url) == (160, 160)
    lines = (library / "captions.jsonl").read_text().splitlines()
    captions = len({json.loads(line)["caption"] for line in lines})  # exact duplicates are stored once
    status = json.loads(clipseek("status", "--json", "--index", url).stdout)
    assert status["counts"] == [["image", None, 160], ["text", "demo", captions]]
    assert "ok" in clipseek("check", "--index", url).stderr  # the shared folder's vector files caught up


def _image(number: int, dim: int, rng: np.random.Generator) -> NewImage:
    vector = rng.standard_normal(dim).astype(np.float32)
    vector /= np.linalg.norm(vector)
    return NewImage(f"/pictures/{number:05d}.jpg".encode(), 1, 1, f"{number:064x}", 8, 8, "2024-01-01", vector)


@pytest.fixture
def demo_place(catalog_place, home, demo_encoder):
    """An empty index on each back end, its model claimed (the demo model's identity)."""
    with Store.open(catalog_place, write=True, create=True) as store:
        store.claim_model(demo_encoder.model_id, None)
    return catalog_place


def test_a_reader_follows_a_writers_commits(demo_place, demo_encoder):
    from search.engine import SearchEngine
    from search.query import Query

    dim = demo_encoder.model_id.dim
    rng = np.random.default_rng(0)
    images = [_image(number, dim, rng) for number in range(300)]
    with Store.open(demo_place, write=True) as writer, SearchEngine.open(demo_place) as reader:
        # Past PostgreSQL's generic plans of statements psycopg prepares (from about the eleventh run).
        for start in range(0, 100, 5):
            with writer.write(index_vectors=False) as transaction:  # the catalog alone: one connection
                transaction.add_images(images[start : start + 5])
        writer.flush()
        assert len(reader.search(Query.vector(images[5].vector), k=500)) == 100
        with writer.write() as transaction:  # committed, its vector file not yet saved
            transaction.add_images(images[100:])
        found = reader.search(Query.vector(images[250].vector), k=500)
        assert len(found) == 300 and found[0].path == "/pictures/00250.jpg"


def test_writers_of_the_same_items_store_them_once(demo_place, demo_encoder):
    if not demo_place.startswith("postgresql://"):
        with Store.open(demo_place, write=True), pytest.raises(Exception, match="being written by process"):
            Store.open(demo_place, write=True)
        return
    rng = np.random.default_rng(1)
    images = [_image(number, demo_encoder.model_id.dim, rng) for number in range(64)]
    first, second = Store.open(demo_place, write=True), Store.open(demo_place, write=True)
    try:
        with first.write() as one:
            assert None not in one.add_images(images[:40])
            stored = threading.Event()

            def overlapping():  # waits on the first's uncommitted rows, then skips them
                with second.write() as two:
                    stored.ids = two.add_images(images[20:])
                stored.set()

            thread = threading.Thread(target=overlapping)
            thread.start()
            assert not stored.wait(0.5)  # held by the first writer's row locks
        thread.join(timeout=30)
        assert stored.ids[:20] == [None] * 20 and None not in stored.ids[20:]
        first.catch_up()
        second.catch_up()  # its vector file lacked the first's commit: caught up from the catalog
    finally:
        first.close()
        second.close()
    assert image_rows(demo_place) == (64, 64)
    with Store.open(demo_place) as reader:
        assert reader.check() == []
        assert reader.catalog.generation() >= 3  # claimed, then the two commits, each its own generation


def test_a_reader_of_a_missing_catalog_says_so(postgres, home):
    with pytest.raises(IndexNotFoundError, match="no index in postgresql://"):
        Store.open(postgres.new_database())


def test_a_deadlock_between_writers_is_one_clear_error_that_keeps_nothing_of_its_transaction(
    postgres, home, demo_encoder
):
    url = postgres.new_database()
    with Store.open(url, write=True, create=True) as store:
        store.claim_model(demo_encoder.model_id, None)
    rng = np.random.default_rng(2)
    images = [_image(number, demo_encoder.model_id.dim, rng) for number in range(2)]
    both_started, errors = threading.Barrier(2), []

    def write(store: Store, order: tuple[int, int]) -> None:  # each takes one row, then wants the other's
        try:
            with store.write(index_vectors=False) as writer:
                writer.add_images([images[order[0]]])
                both_started.wait()
                writer.add_images([images[order[1]]])
        except StoreError as error:
            errors.append(str(error))

    stores = [Store.open(url, write=True), Store.open(url, write=True)]
    try:
        orders = [(0, 1), (1, 0)]
        threads = [threading.Thread(target=write, args=pair) for pair in zip(stores, orders, strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        for store in stores:
            store.close()
    assert len(errors) == 1 and "collided with a concurrent writer's (deadlock detected)" in errors[0]
    assert "run the command again" in errors[0]
    assert image_rows(url) == (2, 2)  # the other writer's transaction, whole


def test_without_psycopg_a_postgresql_url_says_what_to_install(home, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as where the postgres extra is not installed
    with pytest.raises(StoreError, match=r"needs psycopg: pip install 'clipseek\[postgres\]'") as raised:
        Store.open("postgresql://me:s3cret@127.0.0.1:1/photos")
    assert "s3cret" not in str(raised.value) and "postgresql://me@127.0.0.1:1/photos" in str(raised.value)
