"""Decoding on every core: the decode pool gives the vectors threads give, with one process or
several; a bad file in it is recorded and skipped; the run says what decoded its pictures and
which stage held it back. The torch encoder of the demo model embeds, so that its preprocessing
is the one the processes run without torch."""

import os
import re

import numpy as np
import pytest
import torch

from indexer.config import PROCESSES_FROM, IndexSettings, usable_cores
from indexer.demo_world import write_library
from indexer.errors import BadFileError
from indexer.models.pixels import Preprocess
from indexer.pipeline import Indexer
from indexer.sources.decode_pool import DecodePool
from indexer.sources.pictures import prepare_picture
from indexer.stage_times import STAGES
from indexer.store import Store
from tests.command_line import clipseek
from tests.crashing_decoder import CRASH_SIZE, CrashingPreprocess

cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs an NVIDIA GPU that torch can use (tests/bench/gpu_check.py measures pinned batches there)",
)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decode-pool") / "library"
    write_library(folder, count=20, seed=9)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    return folder


def index_with(folder, library, encoder, settings):
    with Indexer(Store.open(folder, write=True, create=True), lambda: encoder, settings) as indexer:
        indexer.store.claim_model(encoder.model_id, None)
        report = indexer.index([library])
    with Store.open(folder) as store:
        ids, vectors = store.catalog.vectors("image")
        paths = {item.id: path for path, item in store.catalog.images().items()}
    return report, {paths[item]: vector for item, vector in zip(ids, vectors, strict=True)}


@pytest.fixture(scope="module")
def in_threads(tmp_path_factory, library, demo_encoder):
    return index_with(tmp_path_factory.mktemp("threads"), library, demo_encoder, IndexSettings(processes=False))


@pytest.mark.parametrize("workers", [1, 2])
def test_processes_give_the_vectors_threads_give(tmp_path, library, demo_encoder, in_threads, workers):
    report, vectors = index_with(tmp_path, library, demo_encoder, IndexSettings(workers=workers, processes=True))
    assert report.decoders in {f"{used} process" + ("es" if used > 1 else "") for used in range(1, workers + 1)}
    threads_report, expected = in_threads
    assert threads_report.decoders.endswith(("thread", "threads"))
    assert (report.found, report.embedded, report.failed) == (21, 20, 1)
    assert vectors.keys() == expected.keys() and len(vectors) == 20
    for path, vector in vectors.items():
        np.testing.assert_allclose(vector, expected[path], atol=1e-6)
    (failure,) = report.failures
    assert report.stages.bottleneck in STAGES and report.stages.total > 0
    assert failure[0].endswith("broken.jpg") and "corrupt or truncated picture" in failure[1]


def test_a_picture_that_crashes_its_decoder_is_a_failure_and_the_others_decode(tmp_path, library):
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    preprocess = Preprocess((64, 64), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    paths = [os.fsencode(path) for path in sorted(library.rglob("*.jpg"))[:6]]
    Image.new("RGB", CRASH_SIZE, "red").save(tmp_path / "crash.png")
    paths.insert(3, os.fsencode(tmp_path / "crash.png"))
    pool = DecodePool(2).start()

    def prepare(path):
        try:
            return pool.prepare(path, None, 64, CrashingPreprocess(preprocess)).pixels
        except BadFileError as error:
            return str(error)

    try:
        with ThreadPoolExecutor(4) as threads:
            results = list(threads.map(prepare, paths))
    finally:
        pool.close()
    assert results.pop(3) == "the decoder crashed on it"
    del paths[3]
    for path, pixels in zip(paths, results, strict=True):
        np.testing.assert_array_equal(pixels, prepare_picture(path, None, 64, preprocess).pixels)


def test_processes_are_used_for_large_runs_where_there_are_cores():
    assert not IndexSettings().decode_in_processes(PROCESSES_FROM - 1)
    assert IndexSettings().decode_in_processes(PROCESSES_FROM) == (usable_cores() > 1)
    assert IndexSettings(processes=True).decode_in_processes(1)
    assert not IndexSettings(processes=False).decode_in_processes(10 * PROCESSES_FROM)


def test_the_summary_says_the_rate_what_decoded_and_the_bottleneck(tmp_path, library, monkeypatch):
    monkeypatch.setenv("CLIPSEEK_HOME", str(tmp_path / "home"))
    run = clipseek("index", library, "--model", "demo", "--decode-workers", "2")
    lines = run.stderr.splitlines()
    assert lines[-2].startswith("21 pictures in ") and lines[-2].endswith(
        ": 20 embedded on cpu (ONNX Runtime), 1 failed"
    )
    assert re.fullmatch(
        r"[0-9.]+ pictures/s, decoded in [12] process(es)?; bottleneck: (decode|embed|write) "
        r"\(decode [0-9]+% · embed [0-9]+% · write [0-9]+% of the time\)",
        lines[-3],
    ), lines[-3]
    assert lines[-1].startswith(f"  failed: {library / 'broken.jpg'}: corrupt or truncated picture")
    # the bottleneck named is the stage with the largest share
    shares = {stage: int(share) for stage, share in re.findall(r"(decode|embed|write) ([0-9]+)%", lines[-3])}
    assert shares[re.search(r"bottleneck: (\w+)", lines[-3]).group(1)] == max(shares.values())


@cuda
def test_pinned_batches_on_a_gpu_embed_as_on_the_cpu(demo_encoder, library):
    from indexer.sources.pictures import prepare_picture

    paths = sorted(library.rglob("*.jpg"))[:8]
    pixels = [prepare_picture(os.fsencode(path), None, 64, demo_encoder.pixel_preprocess).pixels for path in paths]
    on_cpu = demo_encoder.embed_preprocessed(pixels)
    try:
        on_gpu = demo_encoder.to_device("cuda:0", half=False).embed_preprocessed(pixels)
    finally:
        demo_encoder.to_device("cpu")
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-4)
