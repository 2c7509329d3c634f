"""A folder of odd pictures indexed as a user runs `clipseek index`: a clean terminal, a camera's MPO
by its first frame, deep greys seen as they are meant to look, and Pillow's word on a failure."""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.demo_world import Scene, render
from indexer.sources.pictures import FORMATS
from search.engine import Query, SearchEngine
from tests.odd_pictures import deep_png, jpeg_with_corrupt_exif, mpo, packed_12bit_tiff, tiff_with_samples

CLIPSEEK = str(Path(sys.executable).parent / "clipseek")
RED_CIRCLE = Scene("circle", "red", "large", "centre", "grass")
BLUE_SQUARE = Scene("square", "blue", "large", "left", "sand")
YELLOW_STAR = Scene("star", "yellow", "large", "right", "water")
# What `clipseek index` itself writes on stderr: the model's one-time export, the summary, failures.
OWN_LINES = re.compile(
    r"exporting .*|[0-9.]+ pictures/s, decoded in .*; bottleneck: .*|\d+ pictures in [0-9.]+ s: .*|  failed: .*"
)


def picture(scene: Scene) -> Image.Image:
    return render(scene, 160, np.random.default_rng(0))


def grey(scene: Scene) -> np.ndarray:
    return np.asarray(picture(scene).convert("L"))


def encoded(image: Image.Image, kind: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, kind, quality=95)
    return out.getvalue()


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """The odd folder, indexed through the CLI; its stderr and the index's folder."""
    root = tmp_path_factory.mktemp("odd")
    library = root / "library"
    library.mkdir()
    files = {
        "camera.mpo": mpo(picture(RED_CIRCLE), picture(BLUE_SQUARE)),
        # 12-bit greys in 16-bit containers: declared by sBIT, by BitsPerSample, or by nothing
        "scan-a.png": deep_png(grey(RED_CIRCLE).astype(np.uint16) * 16, significant_bits=12),
        "scan-b.png": deep_png(grey(BLUE_SQUARE).astype(np.uint16) * 16, significant_bits=12),
        "scan-c.tif": packed_12bit_tiff(grey(YELLOW_STAR).astype(np.uint16) * 16),
        "scan-d.png": deep_png(grey(YELLOW_STAR).astype(np.uint16) * 16),
        "odd-exif.jpg": jpeg_with_corrupt_exif(picture(YELLOW_STAR)),
        "many-samples.tif": tiff_with_samples(9),
    }
    for name, data in files.items():
        (library / name).write_bytes(data)
    env = {**os.environ, "CLIPSEEK_HOME": str(root / "home")}
    run = subprocess.run(
        [CLIPSEEK, "index", str(library), "--model", "demo", "--index", str(root / "index")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return run.stderr, root / "index", library


def stored(index: Path, library: Path) -> dict[str, np.ndarray]:
    with SearchEngine.open(index) as engine:
        hits = engine.search("a picture", k=100)
        return {Path(hit.path).name: engine.embed(Query.item(hit.id)) for hit in hits}


def embedding_of(index: Path, data: bytes) -> np.ndarray:
    with SearchEngine.open(index) as engine:
        return engine.embed(Query.image(data))


def test_the_terminal_shows_only_clipseeks_own_lines(indexed):
    stderr, _, library = indexed
    lines = stderr.splitlines()
    assert all(OWN_LINES.fullmatch(line) for line in lines), stderr
    assert lines[-2].endswith(": 6 embedded on cpu (ONNX Runtime), 1 failed")
    # Pillow's own log line explains the one failure, in its reason and nowhere else
    assert lines[-1] == (
        f"  failed: {library / 'many-samples.tif'}: not a picture in a supported format ({', '.join(FORMATS)}) "
        "(Pillow: More samples per pixel than can be decoded: 9)"
    )


def test_a_cameras_mpo_is_indexed_by_its_first_frame(indexed):
    _, index, library = indexed
    vector = stored(index, library)["camera.mpo"]
    first = embedding_of(index, encoded(picture(RED_CIRCLE), "JPEG"))
    second = embedding_of(index, encoded(picture(BLUE_SQUARE), "JPEG"))
    assert vector @ first > 0.99 and vector @ first > vector @ second + 0.05
    with SearchEngine.open(index) as engine:
        assert Path(engine.search("a large red circle", k=1)[0].path).name == "camera.mpo"


def test_12_bit_greys_look_as_their_8_bit_selves(indexed):
    _, index, library = indexed
    vectors = stored(index, library)
    black = embedding_of(index, encoded(Image.new("L", (160, 160))))
    for name, scene in [
        ("scan-a.png", RED_CIRCLE),
        ("scan-b.png", BLUE_SQUARE),
        ("scan-c.tif", YELLOW_STAR),
        ("scan-d.png", YELLOW_STAR),
    ]:
        expected = embedding_of(index, encoded(Image.fromarray(grey(scene))))
        assert vectors[name] @ expected > 0.99, name
        assert vectors[name] @ black < 0.9, name
    assert vectors["scan-a.png"] @ vectors["scan-b.png"] < 0.9
