import socket
from pathlib import Path

import pytest

import indexer  # noqa: F401  first, as in clipseek's own processes: OpenMP's wait policy, before a test loads torch


@pytest.fixture(scope="session")
def demo_encoder():
    from indexer.models.encoder import load_encoder

    return load_encoder("demo")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails at once, so a test proves it needs no network."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted during a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """One model cache for the whole run (CLI subprocesses included), holding the demo model's
    ONNX export: shared by the run's workers, and by both of `make test`'s runs where
    CLIPSEEK_TEST_CACHE names a folder, so that the export is made once. The first worker makes
    it; the others go on meanwhile (the longest file, first, needs no demo model)."""
    import fcntl
    import os

    from indexer.models import backend

    if os.environ.get("CLIPSEEK_TEST_CACHE"):
        folder = Path(os.environ["CLIPSEEK_TEST_CACHE"])
    elif os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.getbasetemp().parent / "model-cache"  # the workers' common folder
    else:
        folder = tmp_path_factory.getbasetemp() / "model-cache"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["CLIPSEEK_CACHE"] = str(folder)
    with open(folder / ".lock", "w") as lock:  # inside: removed with the folder
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another worker is exporting it; this one starts on a file that needs none
            pass
        else:
            if backend.exported_model("demo", None, None) is None:
                from indexer.models.encoder import load_encoder

                encoder = load_encoder("demo")
                backend.load(encoder.model_id, lambda: encoder)
    yield folder
    del os.environ["CLIPSEEK_CACHE"]


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the whole run (tests/postgres_server.py); skips, saying why, where
    PostgreSQL or psycopg is not installed."""
    from tests.postgres_server import PostgresServer

    folder, why = PostgresServer.find()
    if folder is None:
        pytest.skip(why)
    try:
        import psycopg  # noqa: F401
    except ModuleNotFoundError:
        pytest.skip("psycopg is not installed: pip install 'clipseek[postgres]'")
    server = PostgresServer(folder).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_place(request, tmp_path, monkeypatch):
    """Where a test's index is, on each back end: a folder for SQLite, a new database's URL for
    PostgreSQL (its vector files in the data directory, put in tmp_path/home)."""
    if request.param == "sqlite":
        return str(tmp_path / "index")
    monkeypatch.setenv("CLIPSEEK_HOME", str(tmp_path / "home"))
    return request.getfixturevalue("postgres").new_database()


# The files that take longest (each a quarter of a minute to a minute on 2 cores), in that
# order: pytest-xdist hands out whole files in collection order (`--dist loadfile`), so these go
# first and the short files fill in at the end, and the workers finish together.
LONGEST_FIRST = [
    "test_hf_export.py",
    "test_onnx_path.py",
    "test_hf_text_export.py",
    "test_http_fuzz.py",
    "test_index_types.py",
    "test_cli_index.py",
    "test_encoder.py",
    "test_postgres.py",
    "test_first_run.py",
    "test_readme.py",
    "test_devices.py",
    "test_cli_search.py",
    "test_rerun.py",
    "test_http_hostile.py",
    "test_mapped_embeddings.py",
]


def pytest_collection_modifyitems(items):
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
