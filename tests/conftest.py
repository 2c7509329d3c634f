import socket

import pytest


@pytest.fixture(scope="session")
def demo_encoder():
    from indexer.encoder import load_encoder

    return load_encoder("demo")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails at once, so a test proves it needs no network."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted during a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
