"""Image preprocessing without torch gives exactly the numbers of open_clip's transform."""

import numpy as np
import open_clip
import pytest
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.pretrained import list_pretrained
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
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


# a model of each family a user picks, with its pretrained tag: its mean and std, interpolation and resize mode
FAMILIES = [
    ("ViT-B-32", "laion2b_s34b_b79k"),  # CLIP: the shorter side, a centre crop
    ("MobileCLIP-S1", "datacompdr"),  # bilinear, no normalisation, 256 px
    ("ViT-L-14", "laion2b_s32b_b82k"),  # mean and std 0.5
    ("xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k"),
    ("xlm-roberta-large-ViT-H-14", "frozen_laion5b_s13b_b90k"),
    ("ViT-B-16-SigLIP", "webli"),  # squashed to a square, mean and std 0.5
    ("ViT-B-16-SigLIP-i18n-256", "webli"),
    ("ViT-B-16-SigLIP2", "webli"),
    ("ViT-SO400M-16-SigLIP2-384", "webli"),
    ("ViT-SO400M-14-SigLIP2-378", "webli"),
    ("nllb-clip-base-siglip", "v1"),
    ("nllb-clip-large-siglip", "v1"),
    ("ViT-L-14-CLIPA-336", "datacomp1b"),  # squashed, bilinear, ImageNet's mean and std
    ("ViT-H-14-378", "dfn5b"),  # squashed, bicubic, CLIP's mean and std
    ("PE-Core-B-16", "meta"),  # squashed, bilinear
]


def _open_clips_settings(model: str, tag: str) -> dict:
    """The preprocess config open_clip gives the model (its `visual.preprocess_cfg`), without
    building it: the tag's settings over the defaults, at the vision tower's input size."""
    config = merge_preprocess_dict(PreprocessCfg(), open_clip.get_pretrained_cfg(model, tag))
    return config | {"size": open_clip.get_model_config(model)["vision_cfg"]["image_size"]}


@pytest.mark.parametrize(("model", "tag"), FAMILIES)
def test_each_familys_pixels_equal_open_clips(model, tag):
    settings = _open_clips_settings(model, tag)
    theirs = image_transform_v2(PreprocessCfg(**settings), is_train=False)
    ours = Preprocess.from_open_clip(settings)
    side = ours.size[0]
    for number, (width, height) in enumerate(SHAPES):
        for mode in ("RGB", "L"):
            picture = _picture(width, height, mode, number)
            expected = theirs(picture).numpy()
            got = ours(picture)
            assert got.shape == expected.shape == (3, side, side)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=f"{width}×{height} {mode}")


def test_every_pretrained_tags_preprocessing_is_ported():
    refused = {}
    for model, tag in list_pretrained():
        try:
            Preprocess.from_open_clip(_open_clips_settings(model, tag))
        except ValueError as error:
            refused[f"{model}/{tag}"] = str(error)
    assert refused == {}


def test_it_round_trips_through_a_manifest():
    preprocess = Preprocess((224, 224), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    assert Preprocess.from_dict(preprocess.to_dict()) == preprocess


def test_what_is_not_ported_is_refused():
    settings = _open_clips_settings("ViT-B-32", "laion2b_s34b_b79k")
    with pytest.raises(ValueError, match="unsupported preprocessing: pictures in L mode"):
        Preprocess.from_open_clip(settings | {"mode": "L"})
    with pytest.raises(ValueError, match="unsupported"):
        Preprocess((224, 224), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, resize_mode="longest")
    with pytest.raises(ValueError, match="non-square"):
        Preprocess((224, 256), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
