"""Fetching a query picture from a URL for a client, without becoming a way into the server's network.

Only http(s); the host's addresses must all be public (no loopback, private, link-local,
multicast or reserved ones), and the connection goes to the address that was checked, so a
DNS answer that changes between the check and the connection cannot redirect it. Redirects are
not followed; the body is read up to a size limit, under a timeout.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from urllib.parse import urlsplit

from indexer.errors import QueryError


def fetch_image(url: str, max_bytes: int, timeout: float = 10.0) -> bytes:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise QueryError(f"image_url must be an http or https URL, not {url[:100]!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = _public_address(parts.hostname, port)
    kind = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    connection = kind(parts.hostname, port, address, timeout)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("GET", target, headers={"User-Agent": "clipseek", "Accept": "image/*"})
        response = connection.getresponse()
        if response.status != 200:
            raise QueryError(f"image_url answered HTTP {response.status} (redirects are not followed)")
        body = response.read(max_bytes + 1)
    except (OSError, http.client.HTTPException) as error:
        raise QueryError(f"cannot fetch image_url: {error}") from error
    finally:
        connection.close()
    if len(body) > max_bytes:
        raise QueryError(f"image_url is larger than {max_bytes} bytes")
    return body


def _public_address(host: str, port: int) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise QueryError(f"cannot resolve {host}: {error}") from error
    addresses = {info[4][0] for info in infos}
    for address in addresses:
        if not ipaddress.ip_address(address.split("%")[0]).is_global:
            raise QueryError(f"image_url refused: {host} is a private, loopback or reserved address ({address})")
    return sorted(addresses)[0]


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
