"""Fetching a query picture from a URL for a client, without becoming a way into the server's network.

Only http(s); the host's addresses must all be public (is_public: no loopback, private,
link-local, multicast or reserved ones, nor one of those inside an IPv6 address), and the
connection goes to the address that was checked, so a DNS answer that changes between the check
and the connection cannot redirect it. Redirects are not followed; the body is read up to a size
limit, under a timeout.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from urllib.parse import urlsplit

from indexer.errors import QueryError

# Networks that some Pythons' ipaddress calls global but that lead to no public host. Python
# 3.11 before 3.11.10, for one, calls 64:ff9b:1::a00:1 and 192.0.0.8 global.
_NOT_PUBLIC = tuple(
    ipaddress.ip_network(network)
    for network in (
        "192.0.0.0/24",  # IETF protocol assignments
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215): translates to the operator's own IPv4 networks
        "2001::/23",  # IETF protocol assignments, Teredo (2001::/32) among them: a tunnel to any IPv4 host
        "fec0::/10",  # site-local, deprecated and still routed inside some networks
    )
)
# IPv6 addresses whose last 32 bits are an IPv4 address the packets go to.
_LOW_32_BITS_V4 = (
    ipaddress.ip_network("::/96"),  # IPv4-compatible (deprecated): ::10.0.0.1
    ipaddress.ip_network("64:ff9b::/96"),  # NAT64's well-known prefix: 64:ff9b::10.0.0.1
)


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


def is_public(address: str) -> bool:
    """Whether a connection to `address` (IPv4 or IPv6, as getaddrinfo gives it) reaches a public host.

    Refused: whatever ipaddress does not call global; multicast; the networks in _NOT_PUBLIC;
    and an IPv6 address carrying an IPv4 address that is not public itself (IPv4-mapped
    ::ffff:10.0.0.1, IPv4-compatible ::10.0.0.1, NAT64 64:ff9b::10.0.0.1, 6to4 2002:a00:1::).
    """
    ip = ipaddress.ip_address(address.split("%")[0])  # a scope (fe80::1%eth0) names no other host
    if not ip.is_global or ip.is_multicast or any(ip in network for network in _NOT_PUBLIC):
        return False
    inner = _embedded_v4(ip)
    return inner is None or is_public(str(inner))


def _embedded_v4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.version == 4:
        return None
    if any(ip in network for network in _LOW_32_BITS_V4):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.ipv4_mapped or ip.sixtofour


def _public_address(host: str, port: int) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise QueryError(f"cannot resolve {host}: {error}") from error
    addresses = {info[4][0] for info in infos}
    for address in addresses:
        if not is_public(address):
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
