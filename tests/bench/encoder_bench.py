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

from indexer.demo_world import caption, held_out_recall, random_scene, render
from indexer.models import backend
from indexer.models.encoder import load_encoder
from indexer.models.onnx_encoder import INT8_COSINE, INT8_PROBE_TEXTS, OnnxEncoder
from indexer.models.speed import best_seconds

IMAGE_GFLOPS = 8.82
TEXT_GFLOPS = 5.96
BATCH = 32


def _best_seconds(work, repeats: int) -> float:
    work()  # warm-up: allocations, kernel selection
    return best_seconds(work, repeats)


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

    def latency(embedder, trim: bool = True) -> float:
        embedder.embed_texts(query, trim=trim)
        samples = []
        for _ in range(30):
            started = time.perf_counter()
            embedder.embed_texts(query, trim=trim)
            samples.append(time.perf_counter() - started)
        return statistics.median(samples) * 1000

    trimmed_ms, full_ms = latency(encoder), latency(encoder, trim=False)
    runtimes = _float32_and_int8(encoder)
    rates = {
        name: (
            BATCH / _best_seconds(lambda e=e: e.embed_images(images, batch_size=BATCH), 3),
            BATCH / _best_seconds(lambda e=e: e.embed_texts(long_texts, batch_size=BATCH, trim=False), 3),
            latency(e),
        )
        for name, e in runtimes.items()
    }
    (onnx_image_rate, onnx_text_rate, onnx_query_ms), (int8_image_rate, int8_text_rate, int8_query_ms) = rates.values()
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
        int8_images_per_s=int8_image_rate,
        int8_texts_per_s=int8_text_rate,
        int8_query_ms=int8_query_ms,
        int8_text_cosine=runtimes["onnx"].manifest["text_int8"]["cosine"],
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
        ("int8 (opt-in): images", f"{int8_image_rate:.1f} /s", f"{int8_image_rate / onnx_image_rate:.2f}× ONNX"),
        ("int8: texts (77 tokens)", f"{int8_text_rate:.1f} /s", f"{int8_text_rate / onnx_text_rate:.2f}× ONNX"),
        ("int8: query, trimmed", f"{int8_query_ms:.1f} ms", f"{onnx_query_ms / int8_query_ms:.2f}× faster than ONNX"),
        _int8_queries(runtimes["onnx"]),
        *_int8_quality(report),
    ]


def _float32_and_int8(encoder) -> dict:
    """The model's export (made here if needed), as "onnx" with every tower in float32 and as "int8"
    with every tower in 8 bits."""
    backend.load(encoder.model_id, lambda: encoder, "onnx")
    folder = backend.export_dir(encoder.model_id)
    return {
        name: OnnxEncoder(folder, encoder.model_id, int8=int8) for name, int8 in [("onnx", "none"), ("int8", "all")]
    }


def _int8_queries(encoder: OnnxEncoder) -> tuple[str, str, str]:
    cosine = encoder.manifest["text_int8"]["cosine"]
    used = "int8" if cosine >= INT8_COSINE else "float32"
    probes = f"min over {len(INT8_PROBE_TEXTS)} probe queries"
    return ("int8 text tower: cosine to float32", f"{cosine:.4f}", f"{probes}; queries take {used} (≥ {INT8_COSINE})")


def _int8_quality(report: dict) -> list[tuple[str, str, str]]:
    """What int8 costs in quality, on the demo model: its vectors against float32's, and held-out recall."""
    model = load_encoder("demo")
    encoders = _float32_and_int8(model)
    recall = {name: held_out_recall(e.embed_images, e.embed_texts) for name, e in encoders.items()}
    rng = np.random.default_rng(7)
    scenes = [random_scene(rng) for _ in range(300)]
    pictures = [render(scene, 256, rng) for scene in scenes]
    texts = [caption(scene) for scene in scenes]
    picture_cos = (encoders["onnx"].embed_images(pictures) * encoders["int8"].embed_images(pictures)).sum(axis=1)
    text_cos = (encoders["onnx"].embed_texts(texts) * encoders["int8"].embed_texts(texts)).sum(axis=1)
    report.update(int8_recall=recall["int8"], float32_recall=recall["onnx"])
    report.update(int8_cosine_pictures=[float(picture_cos.min()), float(picture_cos.mean())])
    report.update(int8_cosine_texts=[float(text_cos.min()), float(text_cos.mean())])
    return [
        (
            "int8, demo model: cosine to float32",
            f"{picture_cos.mean():.4f}",
            f"pictures (min {picture_cos.min():.4f}); texts {text_cos.mean():.4f} (min {text_cos.min():.4f})",
        ),
        (
            "int8, demo model: held-out R@1",
            f"{recall['int8']['all five']:.3f}",
            f"all five attributes (float32 {recall['onnx']['all five']:.3f}); colour + shape "
            f"{recall['int8']['colour+shape']:.3f} (float32 {recall['onnx']['colour+shape']:.3f})",
        ),
    ]
