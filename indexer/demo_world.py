"""The demo world: generated pictures of coloured shapes, with captions that describe them,
in English and in Chinese.

The bundled demo model (data/) is trained on this world, so tests and the demo can assert real
retrieval results ("a large red circle" finds large red circles). Everything here is
deterministic by seed and needs only numpy and Pillow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "yellow": (245, 215, 30),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
}
SIZES = {"small": 0.11, "large": 0.22}  # radius as a fraction of the picture's side
POSITIONS = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "centre": (0.5, 0.5),
}
BACKGROUNDS = ("grass", "sand", "water", "night")
LIBRARY_SIDES = (192, 256, 320)  # square, so that centre-cropping keeps every position
ATTRIBUTES = ("size", "colour", "shape", "position", "background")
VALUES = {
    "size": tuple(SIZES),
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": tuple(POSITIONS),
    "background": BACKGROUNDS,
}

# Several phrasings per attribute, so the model learns the concept rather than one sentence.
_POSITION_WORDS = {
    "left": ("on the left", "at the left", "in the left half"),
    "right": ("on the right", "at the right", "in the right half"),
    "top": ("at the top", "near the top", "in the upper half"),
    "bottom": ("at the bottom", "near the bottom", "in the lower half"),
    "centre": ("in the centre", "in the middle", "in the center"),
}
_BACKGROUND_WORDS = {
    "grass": ("grass", "a lawn", "green grass"),
    "sand": ("sand", "a beach", "sandy ground"),
    "water": ("water", "the sea", "blue water"),
    "night": ("a night sky", "a starry night", "the dark night sky"),
}
# The order random_scene draws in: changing it would change every seeded library.
_DRAW_ORDER = [(name, VALUES[name]) for name in ("shape", "colour", "size", "position", "background")]
_OPENINGS = ("a", "a photo of a", "a picture of a", "an image of a", "a drawing of a")

# Chinese captions are written as a Chinese speaker describes the picture, not word for word:
# "一个红色的大圆在左边，背景是草地", "草地上左边有个大红圆". Each attribute has several words;
# the noun phrase, the position and the background are put together in several orders.
_ZH_SHAPES = {
    "circle": ("圆", "圆形", "圆盘"),
    "square": ("正方形", "方块", "方形"),
    "triangle": ("三角形", "三角"),
    "star": ("星星", "五角星", "星形"),
    "cross": ("十字", "十字形", "加号"),
}
_ZH_COLOURS = {"red": "红", "yellow": "黄", "green": "绿", "blue": "蓝", "purple": "紫", "white": "白"}
_ZH_SIZES = {"small": "小", "large": "大"}
_ZH_POSITIONS = {
    "left": ("左边", "左侧", "画面左边", "靠左的地方"),
    "right": ("右边", "右侧", "画面右边", "靠右的地方"),
    "top": ("上面", "上方", "顶部", "画面上方"),
    "bottom": ("下面", "下方", "底部", "画面下方"),
    "centre": ("中间", "正中间", "中央", "画面中间"),
}
# each background as a noun ("背景是草地") and as a place ("草地上有…")
_ZH_BACKGROUNDS = {
    "grass": (("草地", "草坪", "绿色的草地"), ("草地上", "草坪上")),
    "sand": (("沙滩", "沙地", "沙子"), ("沙滩上", "沙地上")),
    "water": (("水面", "大海", "海水"), ("水面上", "海面上")),
    "night": (("夜空", "星空", "黑色的夜空"), ("夜空中", "星空下", "夜空里")),
}


@dataclass(frozen=True)
class Scene:
    """One picture's attributes; a caption names some or all of them."""

    shape: str
    colour: str
    size: str
    position: str
    background: str

    def matches(self, wanted: dict[str, str]) -> bool:
        return all(getattr(self, name) == value for name, value in wanted.items())


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(**{name: values[rng.integers(len(values))] for name, values in _DRAW_ORDER})


def caption(
    scene: Scene, rng: np.random.Generator | None = None, keep: tuple[str, ...] = ATTRIBUTES, language: str = "en"
) -> str:
    """Describe `scene` in `language` ("en" or "zh"), naming only the attributes in `keep` (the
    shape is always named).

    Without `rng` the canonical phrasing is used:
    "a small red circle on the left over a grass background", "一个红色的小圆在左边，背景是草地".
    """

    def pick(options: tuple[str, ...]) -> str:
        return options[0] if rng is None else options[rng.integers(len(options))]

    if language == "zh":
        return _caption_zh(scene, pick, keep)
    if language != "en":
        raise ValueError(f"the demo world speaks 'en' and 'zh', not {language!r}")

    noun = " ".join([scene.size] * ("size" in keep) + [scene.colour] * ("colour" in keep) + [scene.shape])
    text = f"{pick(_OPENINGS)} {noun}"
    if "position" in keep:
        text += f" {pick(_POSITION_WORDS[scene.position])}"
    if "background" in keep:
        ground = pick(_BACKGROUND_WORDS[scene.background])
        text += pick((f" over a {scene.background} background", f" on {ground}", f" with {ground}"))
    return text


def _caption_zh(scene: Scene, pick: Callable[[tuple[str, ...]], str], keep: tuple[str, ...]) -> str:
    size = _ZH_SIZES[scene.size] if "size" in keep else ""
    colour = _ZH_COLOURS[scene.colour] if "colour" in keep else ""
    shape = pick(_ZH_SHAPES[scene.shape])
    if not colour:
        noun = pick((f"{size}{shape}", f"{size}的{shape}")) if size else shape
    else:  # 红色的大圆, 大红圆, 大的红色圆形
        short = f"{size}{colour}{shape}" if size else f"{colour}色{shape}"
        noun = pick(
            (f"{colour}色的{size}{shape}", short, f"{size}的{colour}色{shape}" if size else f"{colour}色{shape}")
        )
    place = pick(_ZH_POSITIONS[scene.position]) if "position" in keep else None
    if "background" in keep:
        ground, on = (pick(options) for options in _ZH_BACKGROUNDS[scene.background])
    else:
        ground = on = None
    if place and ground:
        return pick(
            (
                f"一个{noun}在{place}，背景是{ground}",
                # "草地上上面" would stutter: above and below follow the thing they place
                f"{on}有个{noun}，在{place}" if scene.position in ("top", "bottom") else f"{on}{place}有个{noun}",
                f"{place}有一个{noun}，背景是{ground}",
                f"{ground}背景，{place}是一个{noun}",
                f"在{ground}的背景上，{place}画着一个{noun}",
            )
        )
    if place:
        return pick((f"一个{noun}在{place}", f"{place}有一个{noun}", f"{place}画着一个{noun}", f"{noun}在{place}"))
    if ground:
        return pick(
            (f"一个{noun}，背景是{ground}", f"{on}有一个{noun}", f"{ground}背景上的{noun}", f"{on}画着个{noun}")
        )
    return pick((f"一个{noun}", noun, f"一张{noun}的图片", f"图里有一个{noun}", f"画着一个{noun}"))


def _background(kind: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """A textured background, (side, side, 3) float in 0..255."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    fine = rng.normal(0.0, 1.0, (side, side, 1))
    if kind == "grass":
        blades = rng.normal(0.0, 1.0, (1, side, 1)) * np.ones((side, 1, 1))
        img = np.array([70, 140, 50]) + 18 * fine + 14 * blades
    elif kind == "sand":
        img = np.array([222, 200, 150]) + 12 * fine + 10 * np.sin(6 * xx + 3 * yy)[..., None]
    elif kind == "water":
        phase = rng.uniform(0, 2 * math.pi)
        waves = np.sin(40 * yy + 4 * np.sin(9 * xx) + phase)[..., None]
        img = np.array([35, 95, 170]) + 22 * waves + 8 * fine
    else:  # night
        img = np.array([14, 18, 46]) + 6 * fine + 45 * yy[..., None]
        stars = rng.random((side, side)) > 0.995
        img[stars] = 235
    return img


def _outline(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    """Polygon points of `shape` centred at (cx, cy) with radius r, rotated by `turn` radians."""
    if shape == "circle":
        corners = [(r, 2 * math.pi * k / 48) for k in range(48)]
    elif shape == "square":
        corners = [(r, turn + math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif shape == "triangle":
        corners = [(r, turn - math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "star":
        corners = [(r if k % 2 == 0 else 0.45 * r, turn - math.pi / 2 + k * math.pi / 5) for k in range(10)]
    else:  # cross: a plus sign of arm width 2a
        a, b = 0.33 * r, r
        square = [
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
        ]
        corners = [(math.hypot(x, y), math.atan2(y, x) + turn) for x, y in square]
    return [(cx + d * math.cos(t), cy + d * math.sin(t)) for d, t in corners]


def render(scene: Scene, side: int, rng: np.random.Generator) -> Image.Image:
    """Draw `scene` as an RGB picture of side × side pixels, with jitter from `rng`."""
    pixels = _background(scene.background, side, rng)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    fx, fy = POSITIONS[scene.position]
    cx = (fx + rng.uniform(-0.04, 0.04)) * side
    cy = (fy + rng.uniform(-0.04, 0.04)) * side
    r = SIZES[scene.size] * rng.uniform(0.88, 1.12) * side
    fill = tuple(int(np.clip(c + rng.integers(-18, 19), 0, 255)) for c in COLOURS[scene.colour])
    turn = rng.uniform(-0.3, 0.3)
    ImageDraw.Draw(image).polygon(
        _outline(scene.shape, cx, cy, r, turn), fill=fill, outline=(25, 25, 25), width=max(1, side // 64)
    )
    return image


@dataclass(frozen=True)
class LibraryPicture:
    """One picture of a generated library: where it is (relative to the library) and what it shows."""

    path: str
    caption: str
    scene: Scene
    caption_zh: str = ""  # the same caption in Chinese


def write_library(
    root: str | Path, count: int = 200, seed: int = 0, progress: Callable[[int], object] | None = None
) -> list[LibraryPicture]:
    """Write `count` demo pictures (JPEG and PNG, nested folders) and their captions under `root`:
    captions.jsonl in English, captions.zh.jsonl in Chinese (the same rows, with "language": "zh").

    The same seed always writes the same files. `progress(1)` is called after each picture.
    Returns what was written.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    pictures = []
    for number in range(count):
        scene = random_scene(rng)
        side = int(rng.choice(LIBRARY_SIDES))
        image = render(scene, side, rng)
        album = f"album-{number // 50 + 1:02d}/{scene.background}"
        suffix = "png" if number % 4 == 3 else "jpg"
        relative = f"{album}/picture-{number:05d}.{suffix}"
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if suffix == "jpg":
            image.save(target, quality=90)
        else:
            image.save(target)
        pictures.append(LibraryPicture(relative, caption(scene), scene, caption(scene, language="zh")))
        if progress is not None:
            progress(1)
    with open(root / "captions.jsonl", "w", encoding="utf-8") as out:
        for picture in pictures:
            row = {"image": picture.path, "caption": picture.caption, **asdict(picture.scene)}
            out.write(json.dumps(row) + "\n")
    with open(root / "captions.zh.jsonl", "w", encoding="utf-8") as out:
        for picture in pictures:
            row = {"image": picture.path, "caption": picture.caption_zh, "language": "zh", **asdict(picture.scene)}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return pictures


def held_out_recall(
    embed_images,
    embed_texts,
    count: int = 500,
    seed: int = 1_000_003,
    language: str = "en",
    phrasings: int | None = None,
) -> dict[str, float]:
    """Text→image Recall@1 of a model on `count` freshly generated pictures.

    Each picture's caption in `language` is the query (the canonical phrasing, or phrasings drawn
    with the seed `phrasings`); a hit is a top-1 picture with the queried attributes.
    `embed_images(list of PIL images)` and `embed_texts(list of str)` return L2-normalised rows.
    Reported for colour + shape ("a red circle") and for all five attributes.
    """
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    images = [render(scene, int(rng.choice(LIBRARY_SIDES)), rng) for scene in scenes]
    image_vectors = np.asarray(embed_images(images))
    recall = {}
    for name, keep in (("colour+shape", ("colour", "shape")), ("all five", ATTRIBUTES)):
        words = None if phrasings is None else np.random.default_rng(phrasings)
        text_vectors = np.asarray(embed_texts([caption(scene, words, keep, language) for scene in scenes]))
        best = np.argmax(text_vectors @ image_vectors.T, axis=1)
        hits = [scenes[b].matches({a: getattr(s, a) for a in keep}) for s, b in zip(scenes, best, strict=True)]
        recall[name] = float(np.mean(hits))
    return recall
