"""Image preprocessing without torch gives exactly the numbers of open_clip's transform."""

import numpy as np
import pytest
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from indexer.models.pixels import Preprocess

SHAPES = [(640, 480), (481, 640), (64, 64), (300, 17), (17, 300), (225, 224), (1, 1), (1001, 999)]


def _picture(width: int, height: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    return Image.fromarray(((noise.astype(np.float32) + ramp) / 2).astype(np.uint8)).convert(mode)


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("side", [64, 224])
def test_pixels_equal_open_clips_transform(side, interpolation, resize_mode):
    theirs = image_transform_v2(
        PreprocessCfg(size=side, interpolation=interpolation, resize_mode=resize_mode), is_train=False
    )
    ours = Preprocess((side, side), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, interpolation, resize_mode)
    for number, (width, height) in enumerate(SHAPES):
        for mode in ("RGB", "L", "RGBA"):
            picture = _picture(width, height, mode, number)
            expected = theirs(picture).numpy()
            got = ours(picture)
            assert got.dtype == np.float32 and got.shape == expected.shape == (3, side, side)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=f"{width}×{height} {mode}")


def test_it_round_trips_through_a_manifest():
    preprocess = Preprocess((224, 224), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    assert Preprocess.from_dict(preprocess.to_dict()) == preprocess


def test_what_is_not_ported_is_refused():
    with pytest.raises(ValueError, match="unsupported"):
        Preprocess((224, 224), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, resize_mode="longest")
    with pytest.raises(ValueError, match="non-square"):
        Preprocess((224, 256), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
