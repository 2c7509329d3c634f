"""The HTTP API under load, against the same queries answered in-process in the same run.

32 clients on loopback, each with its own keep-alive connection, send a mix of text queries
(GET /search) and picture uploads (POST /search/image) for 30 s to `clipseek serve` on a demo
index. Reported: requests/s, p50/p99 latency, errors (target: none), and the throughput as a
ratio of one in-process SearchEngine answering the same mix on one thread. The clients run on
the same two cores as the server, so the figures are a floor.

Before the load, the cost of refusing a picture over the pixel budget: a 20 KB PNG declaring
12,000 × 12,000 pixels, uploaded 20 times and answered 413 from its header. Reported: the median
time per request and how much the server's peak memory grew (goal: under 50 ms, no growth).

After it, the same load with one request in ten hostile, in turn from each class of hostile input
the server refuses (an id beyond 64 bits, a lone surrogate, a NaN in a vector, JSON nested 100,000
deep, a format-string label template, an upload declaring 144 MP). Reported: requests/s and
p50/p99 of the well-formed requests beside the clean run's, and the 5xx answers (target: none).
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
HOSTILE_EVERY = 10  # one request in ten
JSON = {"Content-Type": "application/json"}


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


def _hostile() -> list[tuple[str, object]]:
    """One request of each hostile class: (method, path, httpx arguments, the status it must get)."""
    nan_vector = b'{"num_images": 1, "embedding_input": [NaN' + b", 0.1" * 63 + b"]}"
    template = {"images": [{"item": 1}], "labels": ["red", "blue"], "template": "{0.__class__} {}"}
    requests = [
        ("POST", "/search", {"json": {"item": 2**64}}, 422),
        ("POST", "/search", {"content": b'{"text": "a \\ud800 circle"}', "headers": JSON}, 400),
        ("POST", "/knn-service", {"content": nan_vector, "headers": JSON}, 400),
        ("POST", "/search", {"content": b"[" * 100_000 + b"]" * 100_000, "headers": JSON}, 400),
        ("POST", "/classify", {"json": template}, 422),
        ("POST", "/search/image", {"files": {"image": ("q.png", huge_png(12_000, 12_000))}, "data": {"k": "10"}}, 413),
    ]
    return [("hostile", request) for request in requests]


def _mixed(work, hostile) -> list[tuple[str, object]]:
    """The workload with every HOSTILE_EVERY-th request replaced by the hostile ones in turn."""
    mixed = list(work)
    for n, place in enumerate(range(HOSTILE_EVERY - 1, len(mixed), HOSTILE_EVERY)):
        mixed[place] = hostile[n % len(hostile)]
    return mixed


def _send(client: httpx.Client, kind: str, value) -> tuple[httpx.Response, bool]:
    """A request of the workload and whether its answer is the one it must get."""
    if kind == "hostile":
        method, path, arguments, status = value
        response = client.request(method, path, **arguments)
        return response, response.status_code == status
    if kind == "text":
        response = client.get("/search", params={"text": value, "k": 10})
    else:
        response = client.post("/search/image", files={"image": ("q.jpg", value)}, data={"k": "10"})
    return response, response.status_code == 200 and len(response.json()["hits"]) == 10


def _client(url: str, work, offset: int, stop: threading.Event, load: Load) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        n = offset
        while not stop.is_set():
            kind, value = work[n % len(work)]
            started = time.perf_counter()
            try:
                response, ok = _send(client, kind, value)
            except httpx.HTTPError as error:
                response, ok = error, False
            load.record(kind, response, ok, time.perf_counter() - started)
            n += 1


class Load:
    """What the clients of one load saw: latencies of the well-formed requests answered right, and the rest."""

    def __init__(self):
        self.latencies: list[float] = []
        self.errors: list[str] = []  # well-formed requests not answered 200 with 10 hits, hostile ones not refused
        self.hostile = 0
        self.server_errors = 0  # 5xx answers, whatever the request
        self.seconds = 0.0

    def record(self, kind: str, response, ok: bool, seconds: float) -> None:
        self.hostile += kind == "hostile"
        self.server_errors += getattr(response, "status_code", 0) >= 500
        if not ok:
            self.errors.append(f"{kind}: {response!r}")
        elif kind != "hostile":
            self.latencies.append(seconds)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def percentiles(self) -> tuple[float, float]:
        """p50 and p99 of the well-formed requests, in milliseconds."""
        if not self.latencies:
            return float("nan"), float("nan")
        return tuple(float(np.percentile(self.latencies, q)) * 1000 for q in (50, 99))


def _load(url: str, work, seconds: float) -> Load:
    """CLIENTS clients sending `work` for `seconds`."""
    load, stop = Load(), threading.Event()
    clients = [threading.Thread(target=_client, args=(url, work, i * 7, stop, load)) for i in range(CLIENTS)]
    started = time.perf_counter()
    for client in clients:
        client.start()
    time.sleep(seconds)
    stop.set()
    for client in clients:
        client.join()
    load.seconds = time.perf_counter() - started
    return load


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


def run(report: dict, seconds: float = SECONDS) -> list[tuple[str, str, str]]:
    """The section's rows; `seconds` shortens each load (and the in-process baseline) for a quick look."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        scenes = demo_index(root, count=200, seed=5)
        work = _workload(scenes)
        baseline = _in_process(root / "index", work, min(seconds, 10.0))
        with serving(root / "index") as url:
            refusal, growth = refusals(url, work)
            clean = _load(url, work, seconds)
            hostile = _load(url, _mixed(work, _hostile()), seconds)
    p50, p99 = clean.percentiles()
    hostile_p50, hostile_p99 = hostile.percentiles()
    report.update(
        clients=CLIENTS,
        seconds=seconds,
        requests=len(clean.latencies),
        errors=len(clean.errors),
        error_samples=clean.errors[:5],
        requests_per_s=clean.rate,
        p50_ms=p50,
        p99_ms=p99,
        in_process_per_s=baseline,
        ratio=clean.rate / baseline,
        refusal_ms=refusal * 1000,
        refusal_peak_memory_growth_bytes=growth,
        hostile=dict(
            share=1 / HOSTILE_EVERY,
            requests=len(hostile.latencies) + hostile.hostile,
            hostile_requests=hostile.hostile,
            well_formed_per_s=hostile.rate,
            p50_ms=hostile_p50,
            p99_ms=hostile_p99,
            server_errors=hostile.server_errors,
            errors=len(hostile.errors),
            error_samples=hostile.errors[:5],
        ),
    )
    return [
        (
            "refusing 144 MP in 20 KB",
            f"{refusal * 1000:.1f} ms",
            f"413 from the header, median of {REFUSALS}; goal: < 50 ms",
        ),
        ("  server's peak memory growth", f"{growth / 2**20:.1f} MB", "goal: 0, nothing decoded"),
        ("in-process engine, one thread", f"{baseline:.0f} q/s", "the same text/picture mix, the baseline"),
        (f"HTTP, {CLIENTS} clients", f"{clean.rate:.0f} req/s", f"{clean.rate / baseline:.2f}× the in-process rate"),
        ("latency p50 / p99", f"{p50:.0f} / {p99:.0f} ms", f"over {len(clean.latencies)} requests in {seconds:g} s"),
        ("errors", f"{len(clean.errors)}", "target: 0"),
        (
            f"HTTP, 1 in {HOSTILE_EVERY} hostile",
            f"{hostile.rate:.0f} req/s",
            f"well-formed requests answered; clean run: {clean.rate:.0f} req/s",
        ),
        (
            "  latency p50 / p99, well-formed",
            f"{hostile_p50:.0f} / {hostile_p99:.0f} ms",
            f"clean run: {p50:.0f} / {p99:.0f} ms; {hostile.hostile} hostile requests sent beside them",
        ),
        ("  5xx answers", f"{hostile.server_errors}", f"target: 0; other wrong answers: {len(hostile.errors)}"),
    ]
