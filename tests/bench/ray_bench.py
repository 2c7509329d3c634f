"""Indexing on Ray against the single-process indexer, on this machine with a local Ray.

The same library of phone-size JPEGs and the same model and runtime as the indexing section
(ViT-B-32 with random weights, ONNX Runtime). Each run starts from an empty index and is timed
as a user's `clipseek index` is: for `--ray`, starting Ray, the pipeline, writing and ingesting
the shards, building the vector file and stopping Ray. Reported: pictures/s of the
single-process indexer (the baseline) and of `--ray` with 1 and 2 model actors, and the cost of
a `--ray` run of 6 pictures (what the start, the actors' model loads and the stop cost).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from indexer.config import RaySettings
from indexer.models import backend
from indexer.models.encoder import load_encoder
from indexer.pipeline import Indexer
from indexer.store import Store
from tests.bench.indexer_bench import _phone_library, _timed


def run(report: dict, count: int = 288) -> list[tuple[str, str, str]]:
    model = load_encoder("ViT-B-32", "random")
    encoder = backend.load(model.model_id, lambda: model)  # the export the Ray actors load too
    with tempfile.TemporaryDirectory() as scratch:
        library, small = Path(scratch) / "library", Path(scratch) / "small"
        library.mkdir()
        small.mkdir()
        _phone_library(library, count)
        _phone_library(small, 6)
        runs = iter(range(100))

        def index(folder: Path, ray: RaySettings | None) -> None:
            store = Store.open(Path(scratch) / f"index{next(runs)}", write=True, create=True)
            with Indexer(store, lambda: encoder) as indexer:
                indexer.store.claim_model(encoder.model_id, None)
                indexer.index([folder], ray=ray)

        plain = count / _timed(lambda: index(library, None))
        rates = {
            workers: count / _timed(lambda w=workers: index(library, RaySettings(workers=w))) for workers in (1, 2)
        }
        fixed = _timed(lambda: index(small, RaySettings()))
    report.update(photos=count, plain_images_per_s=plain, ray_images_per_s=rates, ray_six_pictures_s=fixed)
    rows = [("clipseek index, single process", f"{plain:.2f} /s", f"{count} JPEGs of 4000×3000, the baseline")]
    rows += [
        (
            f"clipseek index --ray, {w} model actor{'s' if w > 1 else ''}",
            f"{rate:.2f} /s",
            f"{rate / plain:.2f}× the baseline",
        )
        for w, rate in rates.items()
    ]
    rows.append(("clipseek index --ray, 6 pictures", f"{fixed:.1f} s", "Ray's start and stop, the actors' model loads"))
    return rows
