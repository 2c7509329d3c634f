"""Encoder throughput against the machine's physical limit, the gain of trimming text, and
ONNX Runtime against torch on the same model.

ViT-B-32 with random weights (speed does not depend on the weights). FLOPs per item are
open_clip's profile figures for ViT-B-32: 8.82 GFLOPs per 224 px image, 5.96 per 77-token text.
The ONNX rows run the model's export (indexer/onnx_export.py), which the indexer and queries
use by default; the torch rows are the baseline it must beat to be the default.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from PIL import Image

from indexer import backend
from indexer.encoder import load_encoder

IMAGE_GFLOPS = 8.82
TEXT_GFLOPS = 5.96
BATCH = 32


def _best_seconds(work, repeats: int) -> float:
    work()  # warm-up: allocations, kernel selection
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def matmul_gflops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / _best_seconds(lambda: a @ b, 10) / 1e9


def run(report: dict) -> list[tuple[str, str, str]]:
    peak = matmul_gflops()
    encoder = load_encoder("ViT-B-32", "random")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(BATCH)]
    image_rate = BATCH / _best_seconds(lambda: encoder.embed_images(images, batch_size=BATCH), 3)
    long_texts = [" ".join(["word"] * 80) + f" {i}" for i in range(BATCH)]  # fills all 77 positions
    text_rate = BATCH / _best_seconds(lambda: encoder.embed_texts(long_texts, batch_size=BATCH, trim=False), 3)

    query = ["a cat sunbathing"]

    def latency(trim: bool) -> float:
        encoder.embed_texts(query, trim=trim)
        samples = []
        for _ in range(30):
            started = time.perf_counter()
            encoder.embed_texts(query, trim=trim)
            samples.append(time.perf_counter() - started)
        return statistics.median(samples) * 1000

    trimmed_ms, full_ms = latency(True), latency(False)
    exported = backend.load(encoder.model_id, lambda: encoder, "onnx")
    onnx_image_rate = BATCH / _best_seconds(lambda: exported.embed_images(images, batch_size=BATCH), 3)
    onnx_text_rate = BATCH / _best_seconds(lambda: exported.embed_texts(long_texts, batch_size=BATCH, trim=False), 3)
    encoder = exported
    onnx_query_ms = latency(True)
    report.update(
        matmul_fp32_gflops=peak,
        threads=torch.get_num_threads(),
        vit_b_32_images_per_s=image_rate,
        image_fraction_of_peak=image_rate * IMAGE_GFLOPS / peak,
        vit_b_32_texts_per_s=text_rate,
        text_fraction_of_peak=text_rate * TEXT_GFLOPS / peak,
        query_ms_trimmed=trimmed_ms,
        query_ms_untrimmed=full_ms,
        query_trim_speedup=full_ms / trimmed_ms,
        onnx_images_per_s=onnx_image_rate,
        onnx_texts_per_s=onnx_text_rate,
        onnx_query_ms=onnx_query_ms,
    )
    return [
        ("float32 matmul (2048², torch)", f"{peak:.0f} GFLOP/s", f"{torch.get_num_threads()} threads, the baseline"),
        ("ViT-B-32 images, batch 32", f"{image_rate:.1f} /s", f"{image_rate * IMAGE_GFLOPS / peak:.0%} of matmul peak"),
        (
            "ViT-B-32 texts (77 tokens), batch 32",
            f"{text_rate:.1f} /s",
            f"{text_rate * TEXT_GFLOPS / peak:.0%} of peak",
        ),
        ("query 'a cat sunbathing', trimmed", f"{trimmed_ms:.1f} ms", "median of 30"),
        ("query 'a cat sunbathing', 77 tokens", f"{full_ms:.1f} ms", f"trimming is {full_ms / trimmed_ms:.1f}× faster"),
        (
            "ONNX Runtime: ViT-B-32 images, batch 32",
            f"{onnx_image_rate:.1f} /s",
            f"{onnx_image_rate / image_rate:.2f}× torch ({onnx_image_rate * IMAGE_GFLOPS:.0f} GFLOP/s)",
        ),
        (
            "ONNX Runtime: texts (77 tokens), batch 32",
            f"{onnx_text_rate:.1f} /s",
            f"{onnx_text_rate / text_rate:.2f}× torch",
        ),
        (
            "ONNX Runtime: query, trimmed",
            f"{onnx_query_ms:.1f} ms",
            f"{trimmed_ms / onnx_query_ms:.1f}× faster than torch",
        ),
    ]
