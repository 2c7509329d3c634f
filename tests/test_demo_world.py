import numpy as np

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
