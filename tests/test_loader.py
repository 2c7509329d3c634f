import io
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageFile

from indexer.config import PIXEL_BUDGET
from indexer.errors import BadFileError, PixelBudgetError
from indexer.sources.pictures import FORMATS, decode_image, file_hash, walk
from tests.odd_pictures import deep_png, huge_png, mpo, packed_12bit_tiff, tiff_with_samples

HEIF = pytest.mark.skipif("HEIF" not in FORMATS, reason="pillow-heif is not installed (pip install 'clipseek[heif]')")


def names(entries, root):
    return [os.path.relpath(entry.path, os.fsencode(root)) for entry in entries]


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_walk_finds_pictures_by_suffix_in_a_stable_order(tmp_path):
    for name in ("b/2.JPG", "b/1.png", "a.jpeg", "notes.txt", "c/d/e.webp", "c/raw.cr2"):
        touch(tmp_path / name)
    found = names(walk([os.fsencode(tmp_path)]), tmp_path)
    assert found == [b"a.jpeg", b"b/1.png", b"b/2.JPG", b"c/d/e.webp"]


def test_walk_follows_links_but_visits_each_real_folder_once(tmp_path):
    touch(tmp_path / "real" / "a.jpg")
    (tmp_path / "real" / "loop").symlink_to(tmp_path / "real")
    (tmp_path / "again").symlink_to(tmp_path / "real")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    found = names(walk([os.fsencode(tmp_path)]), tmp_path)
    assert len(found) == 1 and found[0].endswith(b"a.jpg")


def test_walk_keeps_names_that_are_not_utf8(tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    with open(raw, "wb") as out:
        out.write(b"x")
    assert [entry.path for entry in walk([os.fsencode(tmp_path)])] == [raw]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_walk_reports_unreadable_folders(tmp_path):
    touch(tmp_path / "locked" / "a.jpg")
    (tmp_path / "locked").chmod(0)
    errors = []
    try:
        assert list(walk([os.fsencode(tmp_path)], on_error=lambda p, r: errors.append(p))) == []
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert errors == [os.fsencode(tmp_path / "locked")]


def save(image, path, **options):
    image.save(path, **options)
    return os.fsencode(path)


def test_jpeg_is_decoded_in_draft_mode_just_above_the_model_size(tmp_path):
    path = save(Image.new("RGB", (4000, 3000), (200, 30, 30)), tmp_path / "big.jpg", quality=80)
    decoded = decode_image(path, 224)
    assert (decoded.width, decoded.height) == (4000, 3000)
    assert decoded.image.size == (500, 375)  # libjpeg scaled by 1/8, still >= 224 on each side
    assert decoded.image.mode == "RGB"


@pytest.mark.slow
def test_huge_photo_is_decoded_small(tmp_path):
    path = save(Image.new("RGB", (12000, 8000), (10, 120, 10)), tmp_path / "huge.jpg", quality=50)
    decoded = decode_image(path, 224)
    assert (decoded.width, decoded.height) == (12000, 8000)
    assert decoded.image.size == (1500, 1000)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (300, 200), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 150, 200))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display it turned 90° clockwise
    exif.get_ifd(0x8769)[36867] = "2021:07:14 09:30:00"
    decoded = decode_image(save(image, tmp_path / "turned.jpg", exif=exif, quality=95), 64)
    assert (decoded.width, decoded.height) == (200, 300)
    pixels = np.asarray(decoded.image)
    assert pixels.shape[0] > pixels.shape[1]  # upright: taller than wide
    assert pixels[5, 50, 0] > 200 and pixels[5, 50, 1] < 60  # the red half is now on top
    assert pixels[-5, 50, 1] > 200
    assert decoded.taken_at == "2021-07-14T09:30:00"


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("LA", (0, 0), (255, 255, 255)),  # fully transparent: the white it is shown on
        ("I;16", 65535, (255, 255, 255)),  # 16-bit white is scaled, not clipped
        ("I;16", 32896, (128, 128, 128)),
    ],
)
def test_every_mode_becomes_proper_rgb(tmp_path, mode, value, expected):
    suffix = "jpg" if mode == "CMYK" else "png"
    path = save(Image.new(mode, (64, 64), value), tmp_path / f"picture.{suffix}")
    pixels = np.asarray(decode_image(path, 32).image).astype(int)
    assert np.abs(pixels[10, 10] - expected).max() <= 3


def test_palette_transparency_is_flattened_onto_white(tmp_path):
    image = Image.new("P", (32, 32), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    path = save(image, tmp_path / "p.png", transparency=1)
    assert tuple(np.asarray(decode_image(path, 16).image)[0, 0]) == (255, 255, 255)


def test_animation_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert tuple(np.asarray(decode_image(path, 16).image)[5, 5]) == (255, 0, 0)


def bomb_png() -> bytes:
    """A tiny PNG whose header declares 50,000 × 50,000 pixels."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = struct.pack(">II", 50_000, 50_000) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


FITS = b"SIMPLE  =                    T" + b" " * 50 + b"BITPIX  =                    8" + b" " * 50


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.jpg", b"", "empty file"),
        ("random.jpg", bytes(range(256)) * 8, "not a picture"),
        ("document.jpg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "not a picture"),
        ("telescope.jpg", FITS.ljust(2880, b" "), "not a picture"),
        ("bomb.png", bomb_png(), "decompression bomb"),
    ],
)
def test_bad_files_are_refused_with_a_reason(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(BadFileError, match=reason):
        decode_image(os.fsencode(tmp_path / name), 224)


def test_truncated_jpeg_is_refused(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(good)
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:3000])
    with pytest.raises(BadFileError, match="truncated"):
        decode_image(os.fsencode(tmp_path / "cut.jpg"), 64)


def test_vanished_file(tmp_path):
    with pytest.raises(BadFileError, match="vanished"):
        decode_image(os.fsencode(tmp_path / "gone.jpg"), 64)


def test_hashing_a_vanished_file_says_so(tmp_path):
    with pytest.raises(BadFileError, match=r"^vanished$"):
        file_hash(os.fsencode(tmp_path / "gone.jpg"))


@pytest.mark.parametrize(
    "suffix", ["jpg", "png", "webp", "gif", "bmp", "tiff", "avif", pytest.param("heic", marks=HEIF)]
)
def test_every_supported_format_decodes(tmp_path, suffix):
    image = Image.new("RGB", (96, 64), (30, 160, 220))
    path = save(image, tmp_path / f"picture.{suffix}")
    decoded = decode_image(path, 32)
    assert decoded.image.mode == "RGB" and (decoded.width, decoded.height) == (96, 64)
    assert np.abs(np.asarray(decoded.image).astype(int)[20, 40] - (30, 160, 220)).max() <= 12


# -- deep greys, multi-picture JPEGs, Pillow's notes, the pixel budget -----------------------------

TWELVE_BIT = (np.arange(64 * 32).reshape(32, 64) * 2) % 4096  # every 12-bit value, dark and bright
EIGHT_BIT = np.round(TWELVE_BIT / 4095 * 255)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(deep_png(TWELVE_BIT, significant_bits=12), id="png-sbit-low-bits"),
        pytest.param(deep_png(TWELVE_BIT << 4 | TWELVE_BIT >> 8, significant_bits=12), id="png-sbit-high-bits"),
        pytest.param(deep_png(TWELVE_BIT), id="png-undeclared"),
        pytest.param(packed_12bit_tiff(TWELVE_BIT), id="tiff-bits-per-sample-12"),
    ],
)
def test_12_bit_greys_are_scaled_by_their_bits_not_by_16(data):
    pixels = np.asarray(decode_image(io.BytesIO(data), 16).image).astype(int)
    assert np.abs(pixels[..., 0] - EIGHT_BIT).max() <= 1


def test_declared_bits_win_over_the_values_range():
    dark = TWELVE_BIT // 4  # a dark 12-bit scan: its values stay below 1024
    pixels = np.asarray(decode_image(io.BytesIO(deep_png(dark, significant_bits=12)), 16).image).astype(int)
    assert pixels.max() == 64  # dark as it is, not stretched to white, and not black either
    scaled_by_range = np.asarray(decode_image(io.BytesIO(deep_png(dark)), 16).image).astype(int)
    assert scaled_by_range.max() == 255  # undeclared: 10 bits hold the values


def test_a_cameras_mpo_gives_its_first_frame(tmp_path):
    path = tmp_path / "DSCF0001.MPO"
    path.write_bytes(mpo(Image.new("RGB", (64, 48), (255, 0, 0)), Image.new("RGB", (64, 48), (0, 0, 255))))
    assert names(walk([os.fsencode(tmp_path)]), tmp_path) == [b"DSCF0001.MPO"]
    decoded = decode_image(os.fsencode(path), 16)
    assert (decoded.width, decoded.height) == (64, 48)
    assert np.abs(np.asarray(decoded.image).astype(int)[10, 10] - (255, 0, 0)).max() <= 6


def test_pillows_log_lines_go_into_the_reason_of_the_thread_that_caused_them(tmp_path):
    noisy = tmp_path / "noisy.tif"
    noisy.write_bytes(tiff_with_samples(9))
    quiet = tmp_path / "quiet.png"
    quiet.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)

    def reason(path):
        with pytest.raises(BadFileError) as failure:
            decode_image(os.fsencode(path), 16)
        return str(failure.value)

    with ThreadPoolExecutor(4) as pool:
        reasons = list(pool.map(reason, [noisy, quiet] * 50))
    assert len(set(reasons[0::2])) == 1
    assert reasons[0].endswith("(Pillow: More samples per pixel than can be decoded: 9)")
    assert all("Pillow" not in text for text in reasons[1::2])


def decoding_forbidden(image):
    raise AssertionError("the picture was decoded")


def test_a_pixel_budget_refuses_a_huge_picture_from_its_header(monkeypatch):
    monkeypatch.setattr(ImageFile.ImageFile, "load", decoding_forbidden)
    data = huge_png(12_000, 12_000)
    assert len(data) < 30_000
    with pytest.raises(PixelBudgetError, match=r"^12000 × 12000 pixels \(144 MP\) is over the pixel budget of 50 MP$"):
        decode_image(io.BytesIO(data), 224, PIXEL_BUDGET)
    # past Pillow's own limit, a budget still answers as a budget
    with pytest.raises(PixelBudgetError, match=r"^more than 179 MP is over the pixel budget of 50 MP$"):
        decode_image(io.BytesIO(bomb_png()), 224, PIXEL_BUDGET)


def test_the_budget_counts_one_frame_and_only_the_first_is_decoded(tmp_path):
    frames = [Image.new("RGB", (64, 64), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert tuple(np.asarray(decode_image(path, 16, max_pixels=64 * 64).image)[5, 5]) == (255, 0, 0)
    with pytest.raises(PixelBudgetError, match=r"64 × 64 pixels \(0.0041 MP\) is over the pixel budget of 0.004 MP"):
        decode_image(path, 16, max_pixels=4000)
