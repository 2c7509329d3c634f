"""Re-ranking's cost: a warm text query through the Python API on a demo index (200 one-object and
40 two-object pictures, the bundled demo model), without re-ranking and with the demo matcher
re-scoring its first 10 and 30 candidates. p50 of 20 queries each; the ratio is against the
query without re-ranking, measured in the same run. Most of a re-ranked query's time is reading
and resizing the candidates' picture files, which the matcher reads whole.

For real photos, the matcher is BLIP's image-text matching (indexer.models.blip_matcher:
transformers' BlipForImageTextRetrieval, ViT-B/16 at 384 px and a BERT-base text tower with
cross-attention): its architecture at random initialisation (timing does not depend on the
weights), torch float32,
one picture against 30 captions (the vision tower once, the text tower with cross-attention on
each caption) and one text against 30 pictures (the vision tower on each).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from indexer.demo_pairs import write_pairs
from indexer.demo_world import write_library
from indexer.pipeline import Indexer
from search.engine import SearchEngine

RUNS = 20


def _p50(engine: SearchEngine, queries: list[str], rerank: int | None) -> float:
    engine.search(queries[0], k=10, rerank=rerank)  # loads the model, the vectors and the matcher
    times = []
    for number in range(RUNS):
        started = time.perf_counter()
        engine.search(queries[number % len(queries)], k=10, rerank=rerank)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def run(report: dict) -> list[tuple[str, str, str]]:
    with tempfile.TemporaryDirectory(prefix="clipseek-rerank-bench-") as folder:
        root = Path(folder)
        write_library(root / "library", count=200, seed=3)
        queries = [text for _, text in write_pairs(root / "library", count=40, seed=4)]
        with Indexer.open(root / "index", model="demo") as indexer:
            indexer.index([root / "library"])
        with SearchEngine.open(root / "index") as engine:
            plain = _p50(engine, queries, None)
            timed = {count: _p50(engine, queries, count) for count in (10, 30)}
    report.update(plain_ms=plain, **{f"rerank_{count}_ms": ms for count, ms in timed.items()})
    rows = [("text query, no re-ranking", f"{plain:.1f} ms", "p50, warm, demo model")]
    for count, ms in timed.items():
        rows.append((f"re-ranking {count} (demo matcher)", f"{ms:.1f} ms", f"p50; {ms / plain:.1f}× the plain query"))
    return rows + _blip(report)


def _blip(report: dict) -> list[tuple[str, str, str]]:
    try:
        import torch
        from transformers import BlipConfig, BlipForImageTextRetrieval
    except ImportError:
        return [("BLIP ITM", "skipped", "needs the hf extra (transformers)")]
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(BlipConfig()).eval()
    side = model.config.vision_config.image_size
    tokens = torch.randint(1000, 2000, (30, 24))
    with torch.no_grad():
        started = time.perf_counter()
        patches = model.vision_model(pixel_values=torch.randn(30, 3, side, side))[0]
        vision = time.perf_counter() - started
        started = time.perf_counter()
        text = model.text_encoder(
            input_ids=tokens,
            attention_mask=torch.ones_like(tokens),
            encoder_hidden_states=patches,
            encoder_attention_mask=torch.ones(patches.shape[:2], dtype=torch.long),
        ).last_hidden_state
        model.itm_head(text[:, 0])
        fusion = time.perf_counter() - started
    captions, pictures = vision / 30 + fusion, vision + fusion  # one picture's vision pass, or thirty
    report.update(blip_30_captions_ms=captions * 1000, blip_30_pictures_ms=pictures * 1000)
    return [
        ("BLIP ITM, 1 picture × 30 captions", f"{captions * 1000:,.0f} ms", "random weights, torch float32"),
        ("BLIP ITM, 1 text × 30 pictures", f"{pictures * 1000:,.0f} ms", "random weights, torch float32"),
    ]
