"""How the README's red-triangle policy judges the whole demo world, rendered twelve times.

Every scene (colour × shape × size × position × background: 1,200) is rendered with seeds
0-11 and judged by the policy of tests/test_moderation.py; the table gives, per kind of
picture, the range of scores and how many were blocked, reviewed and allowed. Then the
captions that reach the block threshold as texts alone, and how near-duplicates of a picture
score against it. Quality figures, not speed ones: where the demo model's thresholds sit and
what it confuses.
"""

from __future__ import annotations

import io
import itertools
from collections import Counter
from dataclasses import fields

import numpy as np
from PIL import Image

from indexer.demo_world import COLOURS, LIBRARY_SIDES, SHAPES, VALUES, Scene, render
from indexer.models.encoder import load_encoder

PROMPTS = ["a red triangle", "a picture of a red triangle"]
BLOCK, REVIEW = 0.6, 0.55
RENDERINGS = 12


def _kind(scene: Scene) -> str:
    if (scene.colour, scene.shape) == ("red", "triangle"):
        return f"red triangles, {scene.size}"
    if scene.colour == "red":
        return f"other red shapes, {scene.size}"
    return "triangles of other colours" if scene.shape == "triangle" else "other colours, other shapes"


def run(report: dict) -> list[tuple[str, str, str]]:
    encoder = load_encoder("demo")
    prompts = encoder.embed_texts(PROMPTS)
    scenes = [Scene(*values) for values in itertools.product(*(VALUES[f.name] for f in fields(Scene)))]
    scores: dict[str, list[float]] = {}
    decisions: dict[str, Counter] = {}
    for seed in range(RENDERINGS):
        rng = np.random.default_rng(seed)
        pictures = encoder.embed_images([render(scene, int(rng.choice(LIBRARY_SIDES)), rng) for scene in scenes])
        for scene, score in zip(scenes, (pictures @ prompts.T).max(axis=1), strict=True):
            kind = _kind(scene)
            scores.setdefault(kind, []).append(float(score))
            decision = "block" if score >= BLOCK else "review" if score >= REVIEW else "allow"
            decisions.setdefault(kind, Counter())[decision] += 1
    rows = []
    for kind in sorted(scores):
        low, high = min(scores[kind]), max(scores[kind])
        counts = decisions[kind]
        report[kind] = {"scores": [low, high], **counts}
        figure = f"{counts['block']} / {counts['review']} / {counts['allow']}"
        rows.append((f"{kind} ({len(scores[kind])})", figure, f"block / review / allow; scores {low:.3f} – {high:.3f}"))
    return rows + _texts(encoder, prompts, report) + _copies(encoder, report)


def _texts(encoder, prompts, report: dict) -> list[tuple[str, str, str]]:
    captions = [
        f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES if (colour, shape) != ("red", "triangle")
    ]
    scores = (encoder.embed_texts(captions) @ prompts.T).max(axis=1)
    over = sorted(((float(s), c) for s, c in zip(scores, captions, strict=True) if s >= BLOCK), reverse=True)
    report["captions over the block threshold"] = dict((c, s) for s, c in over)
    listed = ", ".join(f"'{c}' {s:.3f}" for s, c in over)
    return [(f"captions alone ≥ {BLOCK}", f"{len(over)} of {len(captions)}", listed)]


def _copies(encoder, report: dict) -> list[tuple[str, str, str]]:
    scene = Scene("star", "purple", "large", "centre", "sand")
    original = render(scene, 256, np.random.default_rng(4))
    copies = []
    for factor in (0.5, 0.7, 0.9):  # resized and saved as JPEG at quality 60
        out = io.BytesIO()
        original.resize((round(256 * factor),) * 2).save(out, "JPEG", quality=60)
        copies.append(Image.open(out).convert("RGB"))
    redraws = [render(scene, 256, np.random.default_rng(seed)) for seed in range(5, 15)]
    anchor, *rest = encoder.embed_images([original, *copies, *redraws])
    similarity = np.asarray(rest) @ anchor
    copied, redrawn = similarity[: len(copies)], similarity[len(copies) :]
    report["near-duplicates"] = {"copies": copied.tolist(), "redraws": redrawn.tolist()}
    return [
        (
            "resized JPEG copies (0.5-0.9×, q60)",
            f"{copied.min():.3f} – {copied.max():.3f}",
            "similarity to the original",
        ),
        ("the same scene drawn again (10)", f"{redrawn.min():.3f} – {redrawn.max():.3f}", "other texture and jitter"),
    ]
