"""--fetch-urls' address rules, on the address function itself and on fetches that stay on loopback."""

import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from indexer.errors import QueryError
from search.http import url_fetch
from search.http.url_fetch import fetch_image, is_public


@pytest.mark.parametrize(
    "address",
    [
        # IPv4 that leads inside
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "192.0.0.8",  # IETF protocol assignments
        "198.18.0.1",  # benchmarking
        "203.0.113.5",  # documentation
        "240.0.0.1",  # reserved
        "255.255.255.255",
        "224.0.0.1",  # multicast
        "239.255.255.250",
        # IPv6 that leads inside
        "::1",
        "::",
        "fe80::1",
        "fe80::1%eth0",
        "fc00::1",
        "fd12:3456::1",
        "fec0::1",  # site-local
        "2001:db8::1",  # documentation
        "ff02::1",  # multicast, link scope
        "ff0e::1",  # multicast, global scope
        # private IPv4 inside IPv6
        "::ffff:10.0.0.1",  # IPv4-mapped
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::10.0.0.1",  # IPv4-compatible
        "::127.0.0.1",
        "::192.168.0.1",
        "64:ff9b::10.0.0.1",  # NAT64 well-known prefix
        "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b:1::a00:1",  # local-use NAT64, whatever follows
        "64:ff9b:1:ffff::808:808",
        "2002:a00:1::",  # 6to4 of 10.0.0.1
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
        "2001::1",
        "2001:0:a00:1::",
    ],
)
def test_addresses_that_lead_inside_are_refused(address):
    assert not is_public(address)


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808"],
)
def test_public_addresses_are_allowed(address):
    assert is_public(address)


@pytest.mark.parametrize(
    "url",
    [
        "http://[::ffff:127.0.0.1]:9/x.jpg",
        "http://[::ffff:10.0.0.1]/x.jpg",
        "http://[::1]/x.jpg",
        "http://2130706433/x.jpg",  # 127.0.0.1 as one number
        "http://0x7f.1/x.jpg",
    ],
)
def test_fetch_refuses_before_connecting(monkeypatch, url):
    def no_connection(*args, **kwargs):
        raise AssertionError("connected to a refused address")

    monkeypatch.setattr(socket, "create_connection", no_connection)
    with pytest.raises(QueryError, match="refused"):
        fetch_image(url, 1000)


def test_one_inside_address_among_public_ones_refuses_the_host(monkeypatch):
    answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 80)) for ip in ("8.8.8.8", "10.0.0.1")]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: answers)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("connected"))
    with pytest.raises(QueryError, match=r"refused: images\.example is a private.*10\.0\.0\.1"):
        fetch_image("http://images.example/x.jpg", 1000)


def test_the_connection_goes_to_the_address_that_was_checked(monkeypatch):
    """The name is resolved once; the connection uses that answer, with the name only in Host."""

    class Picture(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(self.headers["Host"].encode())

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Picture)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    resolved = []

    def resolve(host, *args, **kwargs):
        resolved.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(url_fetch, "is_public", lambda address: address == "127.0.0.1")  # this test's one server
    try:
        assert fetch_image(f"http://images.example:{port}/x.jpg", 1000) == f"images.example:{port}".encode()
    finally:
        server.shutdown()
    assert resolved.count("images.example") == 1  # (create_connection looks the literal 127.0.0.1 up too)
