"""Hostile requests to `clipseek serve` over a real socket: each is a 4xx that says why, never a 500
nor a traceback in the server's log."""

import socket
import time

import httpx
import pytest

from tests.http_server import demo_index, serving


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    demo_index(root, count=12)
    return root


@pytest.fixture(scope="module")
def server_log(library):
    return library / "server.log"


@pytest.fixture(scope="module")
def server(library, server_log):
    with serving(library / "index", log=server_log) as url:
        yield url


# -- clients that go away --------------------------------------------------------------------------


def test_a_client_leaving_mid_upload_leaves_one_log_line(server, server_log):
    port = int(server.rsplit(":", 1)[1])
    heads = [
        b"POST /search/image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        b'Content-Length: 100000\r\n\r\n--x\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        + b"\0"
        * 1000,
        b"POST /knn-service HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b'{"text": "a red',
    ]
    for head in heads:
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(head)
            time.sleep(0.3)  # the server reads what was sent before the connection closes
    deadline = time.monotonic() + 10
    while server_log.read_text().count("went away") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    printed = server_log.read_text()
    assert "went away during POST /search/image after sending" in printed
    assert "went away during POST /knn-service after sending 15 bytes of its body" in printed
    assert "Traceback" not in printed and "ClientDisconnect" not in printed
    assert httpx.get(f"{server}/health").status_code == 200
