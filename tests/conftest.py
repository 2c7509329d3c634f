import socket

import pytest


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
    """One model cache for the whole run (CLI subprocesses included): each model is exported to ONNX once."""
    import os

    folder = tmp_path_factory.mktemp("model-cache")
    os.environ["CLIPSEEK_CACHE"] = str(folder)
    yield folder
    del os.environ["CLIPSEEK_CACHE"]
