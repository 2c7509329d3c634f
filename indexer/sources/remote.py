"""The bytes of a picture named in a list: an http(s) URL, an object-store URI, or a local path.

Every read is bounded: remote ones by a deadline, all by a size limit. What cannot be read is a
BadFileError with the reason, recorded like an unreadable file; it never stops a run. Lists are
the user's own (a LAION-style dataset, say), so unlike the HTTP API's image_url, loopback and
private addresses are allowed: the tests serve theirs on loopback.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from indexer.errors import BadFileError

_CHUNK = 1 << 16


def read_source(source: str, timeout: float, max_bytes: int) -> bytes:
    """The bytes at `source`, downloaded within `timeout` seconds (remote ones), at most `max_bytes`."""
    scheme = urlsplit(source).scheme.lower()
    if scheme in ("http", "https"):
        return _download(source, timeout, max_bytes)
    if len(scheme) > 1:  # not a Windows drive letter
        return _object_store(source, max_bytes)
    try:
        with open(source, "rb") as stream:
            return _bounded(stream.read(max_bytes + 1), max_bytes)
    except OSError as error:
        raise BadFileError(f"cannot read: {error.strerror or error}") from error


def _download(url: str, timeout: float, max_bytes: int) -> bytes:
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": "clipseek"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise BadFileError(f"larger than {max_bytes:,} bytes ({int(declared):,} declared)")
            parts, size = [], 0
            while chunk := response.read(_CHUNK):
                parts.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise BadFileError(f"larger than {max_bytes:,} bytes")
                if time.monotonic() > deadline:
                    raise BadFileError(f"timed out: not downloaded within {timeout:g} s")
            return b"".join(parts)
    except urllib.error.HTTPError as error:
        raise BadFileError(f"HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, TimeoutError):
            raise BadFileError(f"timed out: no answer within {timeout:g} s") from None
        raise BadFileError(f"cannot fetch: {reason}") from None
    except TimeoutError:
        raise BadFileError(f"timed out: no answer within {timeout:g} s") from None
    except (http.client.HTTPException, OSError, ValueError) as error:
        raise BadFileError(f"cannot fetch: {error}") from None


def _object_store(uri: str, max_bytes: int) -> bytes:
    """s3://, gs://, hdfs://, file:// … through pyarrow's file systems (Ray Data's own)."""
    import pyarrow.fs

    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
        with filesystem.open_input_stream(path) as stream:
            return _bounded(stream.read(max_bytes + 1), max_bytes)
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        raise BadFileError(f"cannot read: {error}") from None


def _bounded(data: bytes, max_bytes: int) -> bytes:
    if len(data) > max_bytes:
        raise BadFileError(f"larger than {max_bytes:,} bytes")
    return data
