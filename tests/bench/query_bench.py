"""Query latency: a cold `clipseek search` in a fresh process, and warm queries through the Python API.

The index holds 100,000 random unit vectors under ViT-B-32 with random weights (timing does not
depend on the weights). A cold query is the median wall time of five fresh processes, for the
ONNX path (the default) and the torch path (CLIPSEEK_BACKEND=torch), against the bare
`python -c "import torch, open_clip"` in the same run. Targets: the ONNX path takes at most a
fifth of the torch path, and under 1 s. Warm: p50 and p99 of text and picture queries through
one SearchEngine, on each path.
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
from search.engine import Query, SearchEngine

ITEMS = 100_000
MODEL = ModelId("ViT-B-32", RANDOM_WEIGHTS, None, 512, 224)
QUERY = "a cat sunbathing"
COLD_RUNS = 5
CLIPSEEK = str(Path(sys.executable).parent / "clipseek")


def _index(root: Path) -> None:
    rng = np.random.default_rng(0)
    with Store.open(root, write=True, create=True) as store:
        store.claim_model(MODEL, None)
        for start in range(0, ITEMS, 10_000):
            vectors = rng.normal(size=(10_000, MODEL.dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            with store.write() as writer:
                writer.add_images(
                    [
                        NewImage(f"/photos/{start + i:06d}.jpg".encode(), 1, 1, f"{start + i:064x}", 1, 1, "", vector)
                        for i, vector in enumerate(vectors)
                    ]
                )


def _wall(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def _cold(index: Path) -> dict[str, float]:
    env = dict(os.environ)
    commands = {
        "onnx": ([CLIPSEEK, "search", QUERY, "--index", str(index), "-k", "10"], env),
        "torch": ([CLIPSEEK, "search", QUERY, "--index", str(index), "-k", "10"], {**env, "CLIPSEEK_BACKEND": "torch"}),
        "import torch, open_clip": ([sys.executable, "-c", "import torch, open_clip"], env),
    }
    for command, command_env in commands.values():  # warm the page cache; the first makes the ONNX export
        _wall(command, command_env)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(COLD_RUNS):  # interleaved, so that a slow moment of the machine hits every kind alike
        for name, (command, command_env) in commands.items():
            times[name].append(_wall(command, command_env))
    return {name: statistics.median(samples) for name, samples in times.items()}


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
            texts = [
                f"a photo of {n} cats sunbathing on a {colour} sofa" for n in range(50) for colour in ("red", "blue")
            ]
            engine.search(texts[0])
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
        _index(index)
        cold = _cold(index)
        warm = {backend: _warm(index, backend) for backend in ("onnx", "torch")}
    ratio = cold["onnx"] / cold["torch"]
    report.update(items=ITEMS, cold_seconds=cold, cold_onnx_vs_torch=ratio, warm_ms_p50_p99=warm)
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
            rows.append((f"warm {kind} query, {backend}", f"{p50:.1f} ms", f"p50; p99 {p99:.1f} ms"))
    return rows
