"""Query latency: a cold `clipseek search` in a fresh process, and warm queries through the Python API.

The index holds 100,000 random unit vectors under ViT-B-32 with random weights (timing does not
depend on the weights). A cold query is the median wall time of five fresh processes, for the
ONNX path (the default) and the torch path (CLIPSEEK_BACKEND=torch), against the bare
`python -c "import torch, open_clip"` in the same run. Targets: the ONNX path takes at most a
fifth of the torch path, and under 1 s. Warm: p50 and p99 of text and picture queries through
one SearchEngine, on each path.

By size: indexes of 1,000 to 300,000 clustered vectors (the ann section's mixture), each given
the kind `auto` chooses on this machine (Store.fit: exact search while one takes at most the
latency budget here), then the warm text query's p50 through the Python API (goal ≤ 15 ms at
every size, whatever the machine's speed) and recall@10 against exact search on fresh queries.
"""

from __future__ import annotations

import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.models.identity import RANDOM_WEIGHTS, ModelId
from indexer.store import NewImage, Store
from indexer.store.vectors import exact_top
from search.engine import Query, SearchEngine
from tests.bench.ann_bench import mixture

ITEMS = 100_000
MODEL = ModelId("ViT-B-32", RANDOM_WEIGHTS, None, 512, 224)
QUERY = "a cat sunbathing"
COLD_RUNS = 5
CLIPSEEK = str(Path(sys.executable).parent / "clipseek")
SIZES = (1_000, 30_000, 100_000, 300_000)
GOAL_MS = 15.0


def _random_unit(rng: np.random.Generator, count: int) -> np.ndarray:
    vectors = rng.normal(size=(count, MODEL.dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def index_random(root: Path, vectors_of=_random_unit, items: int = ITEMS, model: ModelId = MODEL) -> None:
    """An index of `items` pictures' rows for `model`, their vectors drawn by `vectors_of(rng, count)`."""
    rng = np.random.default_rng(0)
    with Store.open(root, write=True, create=True) as store:
        store.claim_model(model, None)
        for start in range(0, items, 10_000):
            vectors = vectors_of(rng, min(10_000, items - start))
            with store.write() as writer:
                writer.add_images(
                    [
                        NewImage(f"/photos/{start + i:06d}.jpg".encode(), 1, 1, f"{start + i:064x}", 1, 1, "", vector)
                        for i, vector in enumerate(vectors)
                    ]
                )


def wall(command: list[str], env: dict) -> float:
    """Seconds `command` took, start to exit; its error output when it fails."""
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")
    return time.perf_counter() - started


def _cold(index: Path) -> dict[str, float]:
    env = dict(os.environ)
    commands = {
        "onnx": ([CLIPSEEK, "search", QUERY, "--index", str(index), "-k", "10"], env),
        "torch": ([CLIPSEEK, "search", QUERY, "--index", str(index), "-k", "10"], {**env, "CLIPSEEK_BACKEND": "torch"}),
        "import torch, open_clip": ([sys.executable, "-c", "import torch, open_clip"], env),
    }
    for command, command_env in commands.values():  # warm the page cache; the first makes the ONNX export
        wall(command, command_env)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(COLD_RUNS):  # interleaved, so that a slow moment of the machine hits every kind alike
        for name, (command, command_env) in commands.items():
            times[name].append(wall(command, command_env))
    return {name: statistics.median(samples) for name, samples in times.items()}


def _texts() -> list[str]:
    return [f"a photo of {n} cats sunbathing on a {colour} sofa" for n in range(50) for colour in ("red", "blue")]


def _warm_up(engine: SearchEngine) -> None:
    """Queries of the measured texts' lengths but other words: ONNX Runtime plans its memory for
    each new input shape on first sight, which a warm server has long done."""
    for n in range(50):
        engine.search(f"a picture of {n} dogs resting on a green bed", k=10)


def _by_size(scratch: Path) -> list[dict]:
    """Each size's kind as `auto` chooses it here, its warm text query and its recall@10."""
    centres = np.random.default_rng(7).normal(size=(1000, MODEL.dim)).astype(np.float32)
    queries = mixture(200, np.random.default_rng(8), centres)
    results = []
    for size in SIZES:
        root = scratch / f"size-{size}"
        index_random(root, lambda rng, count: mixture(count, rng, centres), size)
        with Store.open(root, write=True) as store:
            store.fit(progress=lambda *_: None)
            decision = store.decisions().get("image")
            spec = store.vectors("image").spec
            ids, vectors = store.catalog.vectors("image")
            truth = ids[exact_top(vectors, queries, 10)]
            found = sum(
                len(np.intersect1d(store.nearest("image", q, 10)[0], t)) for q, t in zip(queries, truth, strict=True)
            )
        with SearchEngine.open(root) as engine:
            texts = _texts()
            _warm_up(engine)
            samples = []
            for text in texts:
                started = time.perf_counter()
                engine.search(text, k=10)
                samples.append((time.perf_counter() - started) * 1000)
        results.append(
            {
                "size": size,
                "kind": spec.describe(),
                "exact_ms": decision.exact_ms if decision else None,
                "p50_ms": float(np.percentile(samples, 50)),
                "recall": found / (10 * len(queries)),
            }
        )
    return results


def _warm(index: Path, backend: str) -> dict[str, tuple[float, float]]:
    os.environ["CLIPSEEK_BACKEND"] = backend
    try:
        with SearchEngine.open(index) as engine:
            rng = np.random.default_rng(1)
            pictures = []
            for _ in range(20):
                out = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(out, "JPEG")
                pictures.append(out.getvalue())
            texts = _texts()
            _warm_up(engine)
            engine.search(Query.image(pictures[0]))
            figures = {}
            for kind, queries in (("text", texts), ("image", [Query.image(p) for p in pictures] * 2)):
                samples = []
                for query in queries:
                    started = time.perf_counter()
                    engine.search(query, k=10)
                    samples.append((time.perf_counter() - started) * 1000)
                figures[kind] = (float(np.percentile(samples, 50)), float(np.percentile(samples, 99)))
            return figures
    finally:
        del os.environ["CLIPSEEK_BACKEND"]


def run(report: dict) -> list[tuple[str, str, str]]:
    with tempfile.TemporaryDirectory() as scratch:
        index = Path(scratch) / "index"
        index_random(index)
        cold = _cold(index)
        warm = {backend: _warm(index, backend) for backend in ("onnx", "torch")}
        sizes = _by_size(Path(scratch))
    ratio = cold["onnx"] / cold["torch"]
    report.update(items=ITEMS, cold_seconds=cold, cold_onnx_vs_torch=ratio, warm_ms_p50_p99=warm, by_size=sizes)
    rows = [
        (
            f"cold `clipseek search`, {ITEMS:,} vectors",
            f"{cold['onnx']:.2f} s",
            f"ONNX; median of {COLD_RUNS} processes",
        ),
        ("  the same through torch", f"{cold['torch']:.2f} s", f"ONNX takes {ratio:.2f} of it (target ≤ 0.2, < 1 s)"),
        ("  python -c 'import torch, open_clip'", f"{cold['import torch, open_clip']:.2f} s", "the import alone"),
    ]
    for backend, figures in warm.items():
        for kind, (p50, p99) in figures.items():
            rows.append((f"warm {kind} query, {backend}, exact search", f"{p50:.1f} ms", f"p50; p99 {p99:.1f} ms"))
    for size in sizes:
        exact = f"exact search {size['exact_ms']:.1f} ms here; " if size["exact_ms"] is not None else ""
        rows.append(
            (
                f"warm text query, {size['size']:,} vectors: auto → {size['kind']}",
                f"{size['p50_ms']:.1f} ms",
                f"p50 (goal ≤ {GOAL_MS:g}); {exact}recall@10 {size['recall']:.3f} against exact search",
            )
        )
    return rows
