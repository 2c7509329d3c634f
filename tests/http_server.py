"""`clipseek serve` started as a user starts it, on a free port, for the HTTP tests and the load benchmark."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from indexer.demo_world import Scene, write_library
from indexer.pipeline import Indexer

CLIPSEEK = str(Path(sys.executable).parent / "clipseek")


def demo_index(root: Path, count: int = 60, seed: int = 33) -> dict[str, Scene]:
    """A demo library under root/library indexed with its captions into root/index; its pictures' scenes by path."""
    pictures = write_library(root / "library", count=count, seed=seed)
    with Indexer.open(root / "index", model="demo") as indexer:
        indexer.index([root / "library"])
        indexer.add_captions(root / "library" / "captions.jsonl", "demo")
    return {str(root / "library" / picture.path): picture.scene for picture in pictures}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server(str):
    """A running server's base URL, with its process id."""

    pid: int


def peak_memory(pid: int) -> int:
    """The most memory (resident, in bytes) a process has held so far: Linux's VmHWM."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


@contextmanager
def serving(index: Path, *args: str, env: dict | None = None, log: Path | None = None):
    """Yields the server's base URL (a Server) once /health answers; stops the server afterwards.

    The server's stderr goes to `log` when one is given, for a test to read what it printed.
    """
    port = free_port()
    command = [CLIPSEEK, "serve", "--index", str(index), "--port", str(port), *args]
    stderr = log.open("w") if log else subprocess.PIPE
    process = subprocess.Popen(
        command, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    url = Server(f"http://127.0.0.1:{port}")
    url.pid = process.pid
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                printed = log.read_text() if log else process.stderr.read()
                raise RuntimeError(f"clipseek serve exited {process.returncode}: {printed}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        if log:
            stderr.close()
