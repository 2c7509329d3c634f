"""Two-object scenes of the demo world, and the attribute-swapped twins of their captions.

    scene = random_pair(rng)   # a small red circle on the left, a large blue square on the right, over sand
    caption(scene)             # "a small red circle on the left and a large blue square on the right over a
                               #  sand background"
    twins(scene)               # the same words with one attribute swapped between the two objects

A dual encoder embeds such a caption and its twins close together (they share every word); a
matcher that reads the picture and the text together tells them apart. The demo matcher
(data/train_matcher.py) is trained and measured on these scenes. Pictures are drawn with the
demo world's own backgrounds and outlines; deterministic by seed, numpy and Pillow only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from indexer import demo_world as world

__all__ = [
    "OBJECT_ATTRIBUTES",
    "PLACES",
    "Description",
    "Thing",
    "TwoScene",
    "caption",
    "describe",
    "describe_one",
    "held_out",
    "random_pair",
    "render",
    "swap",
    "things_of",
    "twins",
    "write_pairs",
]

OBJECT_ATTRIBUTES = ("size", "colour", "shape", "position")  # what each object has; the background is shared
PLACES = (("left", "right"), ("top", "bottom"))  # the two objects' positions, never overlapping


@dataclass(frozen=True)
class Thing:
    """One object of a picture."""

    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class TwoScene:
    """A picture of two objects of different shapes and colours over one background."""

    first: Thing
    second: Thing
    background: str

    @property
    def things(self) -> tuple[Thing, ...]:
        return (self.first, self.second)


@dataclass(frozen=True)
class Description:
    """What a caption says: objects (each a partial Thing, as attribute → value) and maybe a background.
    It is true of a picture when each object it names is a different object of the picture."""

    objects: tuple[tuple[tuple[str, str], ...], ...]
    background: str | None = None

    def true_of(self, things: tuple[Thing, ...], background: str) -> bool:
        if self.background is not None and self.background != background:
            return False
        if len(self.objects) > len(things):
            return False
        wanted = [dict(o) for o in self.objects]
        orders = [(0,), (1,)] if len(wanted) == 1 else [(0, 1), (1, 0)]
        orders = [o for o in orders if max(o) < len(things)]
        return any(
            all(getattr(things[i], a) == v for w, i in zip(wanted, order, strict=True) for a, v in w.items())
            for order in orders
        )


def random_pair(rng: np.random.Generator) -> TwoScene:
    """Two objects with different shapes and different colours, left/right or top/bottom (in either order)."""
    shapes = rng.choice(len(world.SHAPES), 2, replace=False)
    colours = rng.choice(len(world.COLOURS), 2, replace=False)
    sizes = rng.integers(len(world.SIZES), size=2)
    places = PLACES[rng.integers(len(PLACES))]
    if rng.random() < 0.5:
        places = places[::-1]
    things = [
        Thing(world.SHAPES[shapes[n]], tuple(world.COLOURS)[colours[n]], tuple(world.SIZES)[sizes[n]], places[n])
        for n in range(2)
    ]
    background = world.BACKGROUNDS[rng.integers(len(world.BACKGROUNDS))]
    return TwoScene(things[0], things[1], background)


def describe(scene: TwoScene, keep: tuple[str, ...] = (*OBJECT_ATTRIBUTES, "background")) -> Description:
    """The description naming `keep` of both objects (the shape is always named)."""
    objects = tuple(
        tuple((a, getattr(t, a)) for a in OBJECT_ATTRIBUTES if a == "shape" or a in keep) for t in scene.things
    )
    return Description(objects, scene.background if "background" in keep else None)


def describe_one(scene: world.Scene, keep: tuple[str, ...]) -> Description:
    """What a one-object caption of the demo world naming `keep` (and the shape) says."""
    attributes = tuple((a, getattr(scene, a)) for a in OBJECT_ATTRIBUTES if a == "shape" or a in keep)
    return Description((attributes,), scene.background if "background" in keep else None)


def things_of(scene: TwoScene | world.Scene) -> tuple[tuple[Thing, ...], str]:
    """A picture's objects and background, whether it shows one object or two."""
    if isinstance(scene, TwoScene):
        return scene.things, scene.background
    return (Thing(scene.shape, scene.colour, scene.size, scene.position),), scene.background


def caption(scene: TwoScene, rng: np.random.Generator | None = None, keep=(*OBJECT_ATTRIBUTES, "background")) -> str:
    """Describe both objects in the demo world's phrasings, naming only `keep` (the shape always).

    Without `rng` the canonical phrasing is used:
    "a small red circle on the left and a large blue square on the right over a sand background".
    """

    def pick(options: tuple[str, ...]) -> str:
        return options[0] if rng is None else options[rng.integers(len(options))]

    parts = []
    for thing in scene.things:
        noun = " ".join([thing.size] * ("size" in keep) + [thing.colour] * ("colour" in keep) + [thing.shape])
        if "position" in keep:
            noun += f" {pick(world._POSITION_WORDS[thing.position])}"
        parts.append(noun)
    text = f"{pick(world._OPENINGS)} {parts[0]} and a {parts[1]}"
    if "background" in keep:
        ground = pick(world._BACKGROUND_WORDS[scene.background])
        text += pick((f" over a {scene.background} background", f" on {ground}", f", over {ground}"))
    return text


def swap(scene: TwoScene, attribute: str) -> TwoScene:
    """The scene with `attribute` exchanged between its two objects."""
    first, second = scene.first, scene.second
    a, b = getattr(first, attribute), getattr(second, attribute)
    return dataclasses.replace(
        scene,
        first=dataclasses.replace(first, **{attribute: b}),
        second=dataclasses.replace(second, **{attribute: a}),
    )


def twins(scene: TwoScene) -> list[TwoScene]:
    """The scenes whose canonical captions use the same words as `scene`'s, with one attribute of the
    two objects swapped: one twin per attribute in which the objects differ."""
    return [swap(scene, a) for a in OBJECT_ATTRIBUTES if getattr(scene.first, a) != getattr(scene.second, a)]


def render(scene: TwoScene, side: int, rng: np.random.Generator) -> Image.Image:
    """Draw `scene` as an RGB picture of side × side pixels, with the demo world's jitter."""
    image = Image.fromarray(np.clip(world._background(scene.background, side, rng), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for thing in scene.things:
        fx, fy = world.POSITIONS[thing.position]
        cx, cy = (fx + rng.uniform(-0.03, 0.03)) * side, (fy + rng.uniform(-0.03, 0.03)) * side
        r = world.SIZES[thing.size] * rng.uniform(0.8, 0.9) * side  # two large shapes never overlap
        fill = tuple(int(np.clip(c + rng.integers(-18, 19), 0, 255)) for c in world.COLOURS[thing.colour])
        outline = world._outline(thing.shape, cx, cy, r, rng.uniform(-0.3, 0.3))
        draw.polygon(outline, fill=fill, outline=(25, 25, 25), width=max(1, side // 64))
    return image


def held_out(rng: np.random.Generator, count: int) -> tuple[list[TwoScene], list[TwoScene], list[Image.Image]]:
    """`count` scenes and a library of their pictures with one attribute-swapped twin of each, so that
    a query's twin is always there: (scenes, library scenes, library pictures)."""
    scenes = [random_pair(rng) for _ in range(count)]
    library = scenes + [twins(s)[rng.integers(len(twins(s)))] for s in scenes]
    return scenes, library, [render(s, int(rng.choice(world.LIBRARY_SIDES)), rng) for s in library]


def write_pairs(root: str | Path, count: int = 20, seed: int = 7, folder: str = "pairs") -> list[tuple[str, str]]:
    """Write `count` two-object pictures under root/folder (JPEG) and their captions to
    root/folder/captions.jsonl: scenes and their colour-swapped twins, alternately, so that each
    caption's twin is in the library too. The same seed writes the same files. Returns
    (path, caption) pairs, paths relative to `root`."""
    root = Path(root)
    (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    for number in range(count):
        if number % 2 == 0:
            original = random_pair(rng)
        scene = original if number % 2 == 0 else swap(original, "colour")
        relative = f"{folder}/pair-{number:03d}.jpg"
        render(scene, int(rng.choice(world.LIBRARY_SIDES)), rng).save(root / relative, quality=90)
        written.append((relative, caption(scene)))
    with open(root / folder / "captions.jsonl", "w", encoding="utf-8") as out:
        for relative, text in written:
            out.write(json.dumps({"image": relative, "caption": text}) + "\n")
    return written
