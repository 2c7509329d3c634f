import json

import numpy as np
import pytest

from indexer import demo_world
from indexer.demo_world import Scene, caption


def test_canonical_caption_names_every_attribute():
    scene = Scene(shape="circle", colour="red", size="small", position="left", background="grass")
    assert caption(scene) == "a small red circle on the left over a grass background"
    assert caption(scene, keep=("colour", "shape")) == "a red circle"


def test_varied_captions_keep_the_attributes():
    rng = np.random.default_rng(0)
    scene = Scene(shape="star", colour="blue", size="large", position="top", background="water")
    phrasings = {caption(scene, rng) for _ in range(50)}
    assert len(phrasings) > 10
    assert all("large blue star" in text for text in phrasings)


def test_canonical_chinese_caption_names_every_attribute():
    scene = Scene(shape="circle", colour="red", size="large", position="left", background="grass")
    assert caption(scene, language="zh") == "一个红色的大圆在左边，背景是草地"
    assert caption(scene, keep=("colour", "shape"), language="zh") == "一个红色的圆"


def test_varied_chinese_captions_keep_the_attributes_in_many_phrasings():
    rng = np.random.default_rng(0)
    scene = Scene(shape="star", colour="blue", size="small", position="top", background="water")
    phrasings = {caption(scene, rng, language="zh") for _ in range(200)}
    assert len(phrasings) > 50
    assert "草地上左边有个大红圆" in {
        caption(Scene("circle", "red", "large", "left", "grass"), rng, language="zh") for _ in range(2000)
    }
    for text in phrasings:
        assert "蓝" in text and "小" in text and any(word in text for word in ("星", "五角星"))
        assert any(word in text for word in ("上面", "上方", "顶部")) and any(word in text for word in ("水", "海"))
    with pytest.raises(ValueError, match="'en' and 'zh'"):
        caption(scene, language="fr")


def test_the_library_has_its_captions_in_chinese_too(tmp_path):
    pictures = demo_world.write_library(tmp_path, count=6, seed=2)
    rows = [json.loads(line) for line in (tmp_path / "captions.zh.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["image"] for row in rows] == [picture.path for picture in pictures]
    for row, picture in zip(rows, pictures, strict=True):
        assert row["language"] == "zh" and row["caption"] == caption(picture.scene, language="zh")
        assert Scene(**{name: row[name] for name in demo_world.ATTRIBUTES}) == picture.scene


def test_scene_matches_only_its_own_attributes():
    scene = Scene(shape="star", colour="blue", size="large", position="top", background="water")
    assert scene.matches({"colour": "blue", "shape": "star"})
    assert not scene.matches({"colour": "red"})


def test_position_and_size_are_visible_in_the_picture():
    rng = np.random.default_rng(1)
    for position, (fx, fy) in demo_world.POSITIONS.items():
        scene = Scene(shape="square", colour="red", size="large", position=position, background="night")
        pixels = np.asarray(demo_world.render(scene, 200, rng)).astype(int)
        red = (pixels[..., 0] > 150) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
        ys, xs = np.nonzero(red)
        assert abs(xs.mean() / 200 - fx) < 0.08 and abs(ys.mean() / 200 - fy) < 0.08, position
        assert 0.06 < red.mean() < 0.14  # a large square covers about (0.22 × √2)² ≈ 0.1 of the picture
