"""JPEGs decoded by torchvision (nvJPEG on a GPU) give the CPU path's pixels: the same picture,
the same way up, within a resizing tolerance. torchvision's decoder runs on the CPU here (the
same code path, libjpeg-turbo for nvJPEG); the GPU's own case skips where there is none."""

import io
import os

import numpy as np
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from indexer.models.gpu_jpegs import GpuJpegs
from indexer.models.pixels import Preprocess
from indexer.sources.pictures import jpeg_header, prepare_picture

CLIP = Preprocess((224, 224), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
TOLERANCE = 0.06  # mean absolute difference of normalised pixels (their range is about 4)


def photo(size, seed=0) -> Image.Image:
    """Smooth shapes and an off-centre bright corner, so that a picture turned the wrong way differs."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    pixels = np.asarray(coarse).copy()
    pixels[: size[1] // 5, : size[0] // 4] = 255
    return Image.fromarray(pixels)


def save(path, image, orientation=None, **options):
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(path, "JPEG", quality=92, exif=exif, **options)
    return os.fsencode(path)


def both(path, preprocess=CLIP):
    on_cpu = prepare_picture(path, None, preprocess.size[0], preprocess)
    header = jpeg_header(path, None)
    (pixels,) = GpuJpegs(preprocess, "cpu").prepare([header])
    return on_cpu, header, pixels


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_as_on_the_cpu(tmp_path, orientation):
    path = save(tmp_path / "turned.jpg", photo((640, 400)), orientation)
    on_cpu, header, pixels = both(path)
    assert (header.width, header.height) == (on_cpu.width, on_cpu.height)
    assert pixels.shape == on_cpu.pixels.shape
    assert np.abs(pixels - on_cpu.pixels).mean() < TOLERANCE


def test_a_phone_photo_decoded_whole_matches_the_cpu_paths_reduced_decoding(tmp_path):
    path = save(tmp_path / "phone.jpg", photo((2000, 1500), seed=3), 6)
    on_cpu, _, pixels = both(path)
    assert np.abs(pixels - on_cpu.pixels).mean() < TOLERANCE


def test_grey_and_squashed_pictures_match_too(tmp_path):
    path = save(tmp_path / "grey.jpg", photo((500, 300), seed=4).convert("L"))
    squash = Preprocess((224, 224), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, "bilinear", "squash")
    on_cpu, _, pixels = both(path, squash)
    assert np.abs(pixels - on_cpu.pixels).mean() < TOLERANCE


def test_the_demo_model_embeds_them_alike(tmp_path, demo_encoder):
    paths = [save(tmp_path / f"{seed}.jpg", photo((800, 600), seed), seed % 8 + 1) for seed in range(6)]
    preprocess = demo_encoder.pixel_preprocess
    on_cpu = [prepare_picture(path, None, 64, preprocess).pixels for path in paths]
    decoded = GpuJpegs(preprocess, "cpu").prepare([jpeg_header(path, None) for path in paths])
    cosines = (demo_encoder.embed_preprocessed(on_cpu) * demo_encoder.embed_preprocessed(decoded)).sum(1)
    assert cosines.min() > 0.99


def test_only_plain_jpegs_go_to_the_gpu(tmp_path):
    cmyk = save(tmp_path / "cmyk.jpg", photo((300, 200)).convert("CMYK"))
    png = tmp_path / "picture.png"
    photo((300, 200)).save(png)
    assert jpeg_header(cmyk, None) is None
    assert jpeg_header(os.fsencode(png), None) is None
    assert jpeg_header(os.fsencode(tmp_path / "gone.jpg"), None) is None


def test_a_jpeg_its_decoder_refuses_gives_none(tmp_path):
    good = save(tmp_path / "good.jpg", photo((300, 200)))
    buffer = io.BytesIO()
    photo((300, 200)).save(buffer, "JPEG")
    header = jpeg_header(good, None)
    broken = header._replace(data=buffer.getvalue()[:400])  # the header survives, the pixels do not
    pixels = GpuJpegs(CLIP, "cpu").prepare([header, broken])
    assert pixels[0] is not None and pixels[1] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU for nvJPEG (tests/bench/gpu_check.py)")
def test_nvjpeg_on_the_gpu_gives_what_torchvision_gives_on_the_cpu(tmp_path):
    paths = [save(tmp_path / f"{n}.jpg", photo((1200, 900), n), n % 8 + 1) for n in range(4)]
    headers = [jpeg_header(path, None) for path in paths]
    on_cpu = GpuJpegs(CLIP, "cpu").prepare(headers)
    on_gpu = GpuJpegs(CLIP, "cuda:0").prepare(headers)
    for cpu, gpu in zip(on_cpu, on_gpu, strict=True):
        assert np.abs(gpu.cpu().numpy() - cpu).mean() < TOLERANCE


def test_an_index_run_decodes_its_jpegs_there_and_the_rest_on_the_cpu(tmp_path, demo_encoder):
    from indexer.config import IndexSettings
    from indexer.pipeline import Indexer
    from indexer.store import Store

    library = tmp_path / "library"
    library.mkdir()
    for seed in range(5):
        save(library / f"{seed}.jpg", photo((800, 600), seed), seed + 2)
    save(library / "cmyk.jpg", photo((300, 200), 9).convert("CMYK"))
    photo((300, 200), 8).save(library / "picture.png")
    buffer = io.BytesIO()
    photo((300, 200)).save(buffer, "JPEG")
    (library / "broken.jpg").write_bytes(buffer.getvalue()[:400])

    def run(name, settings):
        with Indexer(Store.open(tmp_path / name, write=True, create=True), lambda: demo_encoder, settings) as indexer:
            indexer.store.claim_model(demo_encoder.model_id, None)
            report = indexer.index([library])
        with Store.open(tmp_path / name) as store:
            ids, vectors = store.catalog.vectors("image")
            paths = {item.id: path for path, item in store.catalog.images().items()}
        return report, {paths[item]: vector for item, vector in zip(ids, vectors, strict=True)}

    report, vectors = run("gpu", IndexSettings(gpu_jpegs=True, processes=False))
    expected_report, expected = run("cpu", IndexSettings(processes=False))
    assert report.decoders.endswith("and cpu (5 JPEGs)")  # the CMYK one, the PNG and the broken one: on the CPU
    assert (report.embedded, report.failed) == (expected_report.embedded, expected_report.failed) == (7, 1)
    assert report.failures[0][0].endswith("broken.jpg") and report.failures == expected_report.failures
    assert vectors.keys() == expected.keys()
    assert min(float(vectors[path] @ expected[path]) for path in vectors) > 0.99
