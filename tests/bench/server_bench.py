"""The HTTP API under load, against the same queries answered in-process in the same run.

32 clients on loopback, each with its own keep-alive connection, send a mix of text queries
(GET /search) and picture uploads (POST /search/image) for 30 s to `clipseek serve` on a demo
index. Reported: requests/s, p50/p99 latency, errors (target: none), and the throughput as a
ratio of one in-process SearchEngine answering the same mix on one thread. The clients run on
the same two cores as the server, so the figures are a floor.

Before the load, the cost of refusing a picture over the pixel budget: a 20 KB PNG declaring
12,000 × 12,000 pixels, uploaded 20 times and answered 413 from its header. Reported: the median
time per request and how much the server's peak memory grew (goal: under 50 ms, no growth).
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from search.engine import Query, SearchEngine
from tests.http_server import Server, demo_index, peak_memory, serving
from tests.odd_pictures import huge_png

CLIENTS = 32
SECONDS = 30.0
REFUSALS = 20


def _workload(scenes) -> list[tuple[str, object]]:
    """Half texts, half pictures, in a fixed order."""
    texts = [f"a {s.size} {s.colour} {s.shape} over a {s.background} background" for s in scenes.values()]
    pictures = [Path(path).read_bytes() for path in scenes]
    return [item for pair in zip(texts, pictures, strict=False) for item in (("text", pair[0]), ("image", pair[1]))]


def _in_process(index: Path, work, seconds: float = 10.0) -> float:
    with SearchEngine.open(index) as engine:
        engine.search("warm-up")
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            kind, value = work[done % len(work)]
            engine.search(value if kind == "text" else Query.image(value), k=10)
            done += 1
        return done / (time.perf_counter() - started)


def _client(url: str, work, offset: int, stop: threading.Event, latencies: list, errors: list) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        n = offset
        while not stop.is_set():
            kind, value = work[n % len(work)]
            started = time.perf_counter()
            try:
                if kind == "text":
                    response = client.get("/search", params={"text": value, "k": 10})
                else:
                    response = client.post("/search/image", files={"image": ("q.jpg", value)}, data={"k": "10"})
                ok = response.status_code == 200 and len(response.json()["hits"]) == 10
            except httpx.HTTPError as error:
                ok, response = False, error
            (latencies if ok else errors).append(time.perf_counter() - started if ok else repr(response))
            n += 1


def refusals(url: Server, work) -> tuple[float, int]:
    """Median seconds to answer an upload declaring 144 MP with 413, and the server's peak-memory growth in bytes."""
    huge = huge_png(12_000, 12_000)
    with httpx.Client(base_url=url, timeout=60) as client:

        def upload(data: bytes) -> httpx.Response:
            return client.post("/search/image", files={"image": ("q.png", data)}, data={"k": "10"})

        # warm: the first picture query and the first refusal load what every later one uses
        assert upload(next(value for kind, value in work if kind == "image")).status_code == 200
        assert upload(huge).status_code == 413
        before = peak_memory(url.pid)
        times = []
        for _ in range(REFUSALS):
            started = time.perf_counter()
            assert upload(huge).status_code == 413
            times.append(time.perf_counter() - started)
        return float(np.median(times)), peak_memory(url.pid) - before


def run(report: dict) -> list[tuple[str, str, str]]:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        scenes = demo_index(root, count=200, seed=5)
        work = _workload(scenes)
        baseline = _in_process(root / "index", work)
        with serving(root / "index") as url:
            refusal, growth = refusals(url, work)
            latencies: list[float] = []
            errors: list[str] = []
            stop = threading.Event()
            clients = [
                threading.Thread(target=_client, args=(url, work, i * 7, stop, latencies, errors))
                for i in range(CLIENTS)
            ]
            started = time.perf_counter()
            for client in clients:
                client.start()
            time.sleep(SECONDS)
            stop.set()
            for client in clients:
                client.join()
            elapsed = time.perf_counter() - started
    throughput = len(latencies) / elapsed
    p50, p99 = (float(np.percentile(latencies, q)) * 1000 for q in (50, 99)) if latencies else (float("nan"),) * 2
    report.update(
        clients=CLIENTS,
        seconds=SECONDS,
        requests=len(latencies),
        errors=len(errors),
        error_samples=errors[:5],
        requests_per_s=throughput,
        p50_ms=p50,
        p99_ms=p99,
        in_process_per_s=baseline,
        ratio=throughput / baseline,
        refusal_ms=refusal * 1000,
        refusal_peak_memory_growth_bytes=growth,
    )
    return [
        (
            "refusing 144 MP in 20 KB",
            f"{refusal * 1000:.1f} ms",
            f"413 from the header, median of {REFUSALS}; goal: < 50 ms",
        ),
        ("  server's peak memory growth", f"{growth / 2**20:.1f} MB", "goal: 0, nothing decoded"),
        ("in-process engine, one thread", f"{baseline:.0f} q/s", "the same text/picture mix, the baseline"),
        (f"HTTP, {CLIENTS} clients", f"{throughput:.0f} req/s", f"{throughput / baseline:.2f}× the in-process rate"),
        ("latency p50 / p99", f"{p50:.0f} / {p99:.0f} ms", f"over {len(latencies)} requests in {SECONDS:.0f} s"),
        ("errors", f"{len(errors)}", "target: 0"),
    ]
