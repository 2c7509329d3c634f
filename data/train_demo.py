"""The recipe that trains the bundled demo CLIP in English (stages 1-5); data/train_demo_text.py
then gives it its bilingual text tower (stage 6), and stage 7 teaches its vision tower two-object
pictures (data/demo.json → data/demo.safetensors).

    .venv/bin/python data/train_demo.py --out stage1.safetensors      # stage 1 (about 40 min on 2 cores)
    .venv/bin/python data/train_demo.py --init stage1.safetensors --steps 1600 --lr 5e-4 --seed 1 \
        --out stage2.safetensors                                      # stage 2 (about 27 min)
    .venv/bin/python data/train_demo.py --init stage2.safetensors --steps 1600 --lr 3e-4 --seed 2 \
        --out stage3.safetensors                                      # stage 3 (about 27 min)
    .venv/bin/python data/train_demo.py --init stage3.safetensors --steps 2000 --lr 3e-4 --seed 3 \
        --shape-weight 4 --out stage4.safetensors                     # stage 4 (about 30 min)
    .venv/bin/python data/train_demo.py --init stage4.safetensors --steps 2000 --lr 2e-4 --seed 4 \
        --shape-weight 8 --out stage5.safetensors                     # stage 5 (about 30 min)
    .venv/bin/python data/train_demo_text.py --teacher stage5.safetensors --out stage6.safetensors  # stage 6
    .venv/bin/python data/train_demo.py --pairs --init stage6.safetensors --steps 1200 --lr 3e-4 --seed 6 \
        --shape-weight 4                                              # stage 7: the weights (about 37 min)
    .venv/bin/python data/train_demo.py --eval-only                   # evaluate the committed weights
    .venv/bin/python data/train_demo.py --eval-only --english --out stage5.safetensors   # or stage 5's

Stages 1-5 train demo.json's vision tower with the text tower of ENGLISH_TEXT (CLIP's tokenizer,
registered with open_clip as `demo-en`); their weights are data/demo.safetensors before stage 6
(`git show 2bada42:data/demo.safetensors > stage5.safetensors`), and stage 6's are the file
before stage 7 (`git show a70c5fa:data/demo.safetensors > stage6.safetensors`). The evaluation
runs on the bilingual model: text→image R@1 in English and in Chinese, captions finding each
other across the two languages (text→text), the two-object figures (indexer/demo_pairs.py's
scenes, as data/train_matcher.py measures them), and zero-shot accuracy per attribute in each
language.

Deterministic: the model is initialised from a fixed seed and every step's batch is drawn from
numpy's generator seeded with (seed, step), so the same torch build and thread count reproduce
the same weights. Figures are printed for a held-out set of freshly generated pictures.

Recipe: pictures of the demo world (indexer/demo_world.py) rendered at the demo library's sizes
(192–320 px) and brought to 64 px by the model's own preprocessing, 30% of them through a JPEG
round trip. A batch is made of groups of four scenes: one drawn at random and three that differ
from it in exactly one attribute, so that no attribute can be ignored. Each caption names the
shape and, 60% of the time, every other attribute, else a random subset ("a red circle").
Because a partial caption is true of many pictures in a batch, the contrastive loss takes every
picture a caption is true of as a positive (uniform soft targets). The vision tower has fixed
2-D sin-cos position embeddings. AdamW (lr 1e-3), 2,200 steps of batch 128, linear warm-up then
cosine decay; then two warm restarts, each from the last weights on batches drawn with another
seed: 1,600 steps at lr 5e-4 (seed 1), then 1,600 at lr 3e-4 (seed 2); then two more, 2,000
steps each, where the hard negatives change the shape more often (--shape-weight 4, then 8):
lr 3e-4 (seed 3), then 2e-4 (seed 4). Weights saved as float16.

Stage 1 alone left the text tower blind to position words ("on the left" and "on the right"
embedded alike) and confused stars with triangles; the restarts taught it both (held-out R@1,
all five attributes: 0.458 after stage 1, 0.904 after stage 2, 1.000 after stage 3). Stage 3
still took the odd small star for a triangle (zero-shot shape 0.98), which a policy blocking
red triangles felt; stages 4 and 5 bring shape to 0.99 and 1.00.

Stage 7: stages 1-6 saw one object per picture, so the demo CLIP put a two-object caption's
picture among its first 30 for only 78% of the queries (of 400: 200 scenes and a twin of each),
too few for a re-ranker to work on. Stage 7 trains the vision tower alone, the bilingual text
tower and the temperature kept: half of each batch's groups are two-object scenes
(indexer/demo_pairs.py: a scene, two of its attribute-swapped twins, and the scene with one
object changed), captioned in English; the positives are every picture a caption is true of
(a one-object caption is true of a two-object picture that shows its object). One-object
pictures are held where stage 6 put them (ANCHOR): trained without that, one-object R@1 with
all five attributes fell to 0.984, zero-shot shape to 0.98, and the short captions a moderation
policy uses ("a red triangle") scored 0.22-0.30 where they had scored 0.6. 1,200 steps at lr
3e-4 (seed 6, --shape-weight 4) take the first 30 to 0.970 and two-object R@1 / R@5 from
0.065 / 0.305 to 0.235 / 0.680, with every one-object figure kept at 1.000 (binding stays
poor, 0.130: that is the matcher's job).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from indexer import demo_pairs as pairs  # noqa: E402
from indexer import demo_world as world  # noqa: E402

OPTIONAL = ("size", "colour", "position", "background")
GROUP = 4  # scenes per group: one drawn at random, the others one attribute away from it
PAIR_SHARE = 0.5  # of stage 7's groups, those of two-object scenes
# Stage 7's weight on keeping one-object pictures where stage 6 put them (one minus the cosine):
# without it they drifted from short captions (a red triangle scored 0.22-0.30 for "a red
# triangle", a small red star up to 0.28) and a moderation policy's thresholds lost their
# meaning; at 20, 60 steps were enough to lift a small red star to 0.635; at 100 the drift (one
# minus the mean cosine) stays near 0.0025
ANCHOR = 100.0
ENGLISH = "demo-en"  # the model of stages 1-5: demo.json's vision tower, a text tower with CLIP's tokenizer
ENGLISH_TEXT = {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3}


def register_english(config: Path) -> None:
    """Register the English model with open_clip: `config` with the text tower of stages 1-5."""
    folder = Path(tempfile.mkdtemp())
    (folder / f"{ENGLISH}.json").write_text(json.dumps(json.loads(config.read_text()) | {"text_cfg": ENGLISH_TEXT}))
    open_clip.add_model_config(folder / f"{ENGLISH}.json")


def variant(scene: world.Scene, rng: np.random.Generator, shape_weight: int = 1) -> world.Scene:
    """The scene with one attribute changed: a hard negative that only that attribute tells apart.
    The shape is changed `shape_weight` times as often as each other attribute (drawn from one
    list, so that a weight of 1 draws exactly as the earlier stages did)."""
    attributes = world.ATTRIBUTES + ("shape",) * (shape_weight - 1)
    attribute = attributes[rng.integers(len(attributes))]
    values = [v for v in world.VALUES[attribute] if v != getattr(scene, attribute)]
    return dataclasses.replace(scene, **{attribute: values[rng.integers(len(values))]})


def pair_group(rng: np.random.Generator, shape_weight: int) -> list[pairs.TwoScene]:
    """A two-object scene, two of its attribute-swapped twins, and the scene with one object's
    size, colour or shape changed (to one the other object does not have)."""
    scene = pairs.random_pair(rng)
    twins = pairs.twins(scene)
    group = [scene, *(twins[n] for n in rng.choice(len(twins), 2, replace=False))]
    n = int(rng.integers(2))
    thing, other = scene.things[n], scene.things[1 - n]
    attributes = ("size", "colour", "shape") + ("shape",) * (shape_weight - 1)
    attribute = attributes[rng.integers(len(attributes))]
    taken = {getattr(thing, attribute)} | ({getattr(other, attribute)} if attribute != "size" else set())
    values = [v for v in world.VALUES[attribute] if v not in taken]
    thing = dataclasses.replace(thing, **{attribute: values[rng.integers(len(values))]})
    return [*group, dataclasses.replace(scene, **{("first", "second")[n]: thing})]


def drawn(scene, rng: np.random.Generator) -> tuple[Image.Image, tuple[str, ...]]:
    """The scene rendered at a library size (30% of the time through a JPEG round trip), and the
    attributes its caption names."""
    draw = pairs.render if isinstance(scene, pairs.TwoScene) else world.render
    image = draw(scene, int(rng.choice(world.LIBRARY_SIDES)), rng)
    if rng.random() < 0.3:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(60, 96)))
        image = Image.open(buffer).convert("RGB")
    return image, OPTIONAL if rng.random() < 0.6 else tuple(a for a in OPTIONAL if rng.random() < 0.5)


def batch(step: int, size: int, seed: int, preprocess, tokenizer, shape_weight: int = 1):
    rng = np.random.default_rng([seed, step])
    scenes, images, keeps = [], [], []
    while len(scenes) < size:
        group = [world.random_scene(rng)]
        group += [variant(group[0], rng, shape_weight) for _ in range(GROUP - 1)]
        scenes.extend(group)
    scenes = scenes[:size]
    for scene in scenes:
        image, keep = drawn(scene, rng)
        images.append(preprocess(image))
        keeps.append(("shape", *keep))
    texts = [world.caption(s, rng, keep) for s, keep in zip(scenes, keeps, strict=True)]
    # positives[i, j]: caption i is true of picture j
    positives = torch.tensor(
        [
            [scene.matches({a: getattr(s, a) for a in keep}) for scene in scenes]
            for s, keep in zip(scenes, keeps, strict=True)
        ],
        dtype=torch.float32,
    )
    return torch.stack(images), tokenizer(texts), positives


def picture_batch(step: int, size: int, seed: int, preprocess, shape_weight: int = 1):
    """Stage 7's batch: groups of one-object scenes as in `batch`, and two-object groups
    (`pair_group`); each caption in English, its positives every picture it is true of (a
    one-object caption is true of a two-object picture that shows its object)."""
    rng = np.random.default_rng([seed, step])
    scenes = []
    while len(scenes) < size:
        if rng.random() < PAIR_SHARE:
            scenes += pair_group(rng, shape_weight)
        else:
            scenes += [first := world.random_scene(rng)] + [variant(first, rng, shape_weight) for _ in range(GROUP - 1)]
    scenes = scenes[:size]
    images, texts, descriptions = [], [], []
    for scene in scenes:
        image, keep = drawn(scene, rng)
        images.append(preprocess(image))
        if isinstance(scene, pairs.TwoScene):
            texts.append(pairs.caption(scene, rng, keep))
            descriptions.append(pairs.describe(scene, keep))
        else:
            texts.append(world.caption(scene, rng, ("shape", *keep)))
            descriptions.append(pairs.describe_one(scene, keep))
    positives = torch.tensor(
        [[d.true_of(*pairs.things_of(scene)) for scene in scenes] for d in descriptions], dtype=torch.float32
    )
    single = torch.tensor([not isinstance(scene, pairs.TwoScene) for scene in scenes])
    return torch.stack(images), texts, positives, single


def soft_contrastive_loss(image_features, text_features, logit_scale, positives):
    logits = logit_scale * text_features @ image_features.T  # [texts, images]
    text_to_image = -(F.log_softmax(logits, dim=1) * positives / positives.sum(1, keepdim=True)).sum(1)
    image_to_text = -(F.log_softmax(logits.T, dim=1) * positives.T / positives.T.sum(1, keepdim=True)).sum(1)
    return (text_to_image.mean() + image_to_text.mean()) / 2


def adamw(named: list, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices but the embeddings."""
    decay = [p for n, p in named if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98)
    )


def schedule(step: int, steps: int, warmup: int) -> float:
    """The learning rate's factor: a linear warm-up, then cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def train(
    steps: int, batch_size: int, lr: float, seed: int, out: Path, config: Path, init: Path | None, shape_weight: int
) -> None:
    register_english(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(ENGLISH)
    if init is not None:  # go on from earlier weights (float16 on disk; trained on in float32)
        from safetensors.torch import load_file

        model.load_state_dict({name: tensor.float() for name, tensor in load_file(str(init)).items()})
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    tokenizer = open_clip.get_tokenizer(ENGLISH)
    optimiser, warmup = adamw(list(model.named_parameters()), lr), max(1, steps // 20)
    started = time.time()
    model.train()
    for step in range(steps):
        for group in optimiser.param_groups:
            group["lr"] = lr * schedule(step, steps, warmup)
        images, texts, positives = batch(step, batch_size, seed, preprocess, tokenizer, shape_weight)
        image_features = F.normalize(model.encode_image(images), dim=-1)
        text_features = F.normalize(model.encode_text(texts), dim=-1)
        loss = soft_contrastive_loss(image_features, text_features, model.logit_scale.exp(), positives)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 25 == 0 or step == steps - 1:
            scale, elapsed = model.logit_scale.exp().item(), time.time() - started
            print(f"step {step:5d}/{steps}  loss {loss.item():.4f}  scale {scale:6.2f}  {elapsed:6.0f}s", flush=True)
    state = {name: tensor.detach().half().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(out))
    print(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB) after {time.time() - started:.0f}s")


def train_pictures(steps: int, batch_size: int, lr: float, seed: int, out: Path, init: Path | None, shape_weight: int):
    """Stage 7: the bilingual model's vision tower alone, on one- and two-object pictures, against
    its text tower as it is (so Chinese captions keep their English twins' places), with the
    one-object pictures held near where the starting tower puts them (ANCHOR)."""
    from indexer.models.encoder import load_encoder

    torch.manual_seed(seed)
    encoder = load_encoder("demo", checkpoint=init)
    model, vision = encoder.model, encoder.model.visual
    anchor = copy.deepcopy(vision)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    named = list(vision.named_parameters())
    for _, parameter in named:
        parameter.requires_grad_(True)
    optimiser = adamw(named, lr)
    scale, warmup, started = model.logit_scale.exp().detach(), max(1, steps // 20), time.time()
    for step in range(steps):
        for group in optimiser.param_groups:
            group["lr"] = lr * schedule(step, steps, warmup)
        images, texts, positives, single = picture_batch(step, batch_size, seed, encoder.preprocess, shape_weight)
        text_features = torch.from_numpy(encoder.embed_texts(texts))
        image_features = F.normalize(vision(images), dim=-1)
        with torch.no_grad():
            kept = F.normalize(anchor(images[single]), dim=-1)
        drift = 1 - (image_features[single] * kept).sum(-1).mean()
        loss = soft_contrastive_loss(image_features, text_features, scale, positives) + ANCHOR * drift
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step % 25 == 0 or step == steps - 1:
            figures = f"loss {loss.item():.4f}  drift {drift.item():.4f}  {time.time() - started:6.0f}s"
            print(f"step {step:5d}/{steps}  {figures}", flush=True)
    state = {name: tensor.detach().half().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(out))
    print(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB) after {time.time() - started:.0f}s")


def evaluate(checkpoint: Path, english: bool = False) -> None:
    """The figures of the bilingual model (stage 6), or with `english` of the English one (1-5)."""
    from indexer.models.encoder import load_encoder  # evaluated through clipseek's own loading path

    if english:
        register_english(HERE / "demo.json")
    encoder = load_encoder(ENGLISH if english else "demo", checkpoint=checkpoint)
    languages = ("en",) if english else ("en", "zh")
    for language in languages:
        for name, value in world.held_out_recall(encoder.embed_images, encoder.embed_texts, language=language).items():
            print(f"text→image R@1, {language}, {name}: {value:.3f}")
    if not english:
        varied = world.held_out_recall(encoder.embed_images, encoder.embed_texts, language="zh", phrasings=7)
        print(f"text→image R@1, zh, varied phrasings, all five: {varied['all five']:.3f}")
        for name, value in text_to_text(encoder).items():
            print(f"text→text R@1, {name}: {value:.3f}")
    for name, value in two_object(encoder).items():
        print(f"two-object text→image (200 scenes and a twin of each), {name}: {value:.3f}")
    for language in languages:
        for attribute, accuracy in zero_shot(encoder, language).items():
            chance = 1 / len(world.VALUES[attribute])
            print(f"zero-shot {attribute}, {language}: {accuracy:.2f} (chance {chance:.2f})")
    pairs = (["a red circle on the left", "a red circle on the right"], ["左边的红色圆", "右边的红色圆"])
    for pair in pairs[: len(languages)]:
        left, right = encoder.embed_texts(pair)
        print(f"cosine of {pair[0]!r} and {pair[1]!r}: {left @ right:.2f}")


def text_to_text(encoder, count: int = 500, seed: int = 1_000_003) -> dict[str, float]:
    """Captions of held-out scenes finding each other across languages: a hit is a top-1 caption
    of a scene with the queried attributes (all five: the Chinese and English captions of a
    scene; colour and shape: a short Chinese query among full English captions)."""
    rng = np.random.default_rng(seed)
    scenes = [world.random_scene(rng) for _ in range(count)]
    english, chinese, short = (
        encoder.embed_texts([world.caption(s, keep=keep, language=language) for s in scenes])
        for keep, language in ((world.ATTRIBUTES, "en"), (world.ATTRIBUTES, "zh"), (("colour", "shape"), "zh"))
    )

    def recall(queries, captions, keep) -> float:
        best = np.argmax(queries @ captions.T, axis=1)
        return float(
            np.mean([scenes[b].matches({a: getattr(s, a) for a in keep}) for s, b in zip(scenes, best, strict=True)])
        )

    return {
        "zh caption → en caption": recall(chinese, english, world.ATTRIBUTES),
        "en caption → zh caption": recall(english, chinese, world.ATTRIBUTES),
        "zh colour+shape query → en captions": recall(short, english, ("colour", "shape")),
    }


def two_object(encoder, count: int = 200, seed: int = 2_000_003, shortlist: int = 30) -> dict[str, float]:
    """The dual encoder on held-out two-object scenes (the library and queries of data/train_matcher.py's
    figures): R@1 and R@5 of each scene's caption, how often the described picture is among the
    first `shortlist` (what a re-ranker can reach), and binding accuracy (the caption preferred
    to its attribute-swapped twins)."""
    rng = np.random.default_rng(seed)
    scenes, library, pictures = pairs.held_out(rng, count)
    vectors = encoder.embed_images(pictures)
    order = np.argsort(-(encoder.embed_texts([pairs.caption(s) for s in scenes]) @ vectors.T), axis=1)
    truth = [pairs.describe(scene) for scene in scenes]
    hits = np.array(
        [[truth[q].true_of(*pairs.things_of(library[c])) for c in row[:shortlist]] for q, row in enumerate(order)]
    )
    binding = [
        np.argmax(encoder.embed_texts([pairs.caption(s) for s in [scene, *pairs.twins(scene)]]) @ vectors[n]) == 0
        for n, scene in enumerate(scenes)
    ]
    return {
        "R@1": hits[:, 0].mean(),
        "R@5": hits[:, :5].any(1).mean(),
        f"in the first {shortlist}": hits.any(1).mean(),
        "binding accuracy": np.mean(binding),
    }


def zero_shot(encoder, language: str = "en", count: int = 500, seed: int = 11) -> dict[str, float]:
    """Per attribute: how often a picture's best caption, among captions that differ only in that
    attribute, names the right value (held-out pictures, not the ones R@1 is measured on)."""
    rng = np.random.default_rng(seed)
    scenes = [world.random_scene(rng) for _ in range(count)]
    pictures = encoder.embed_images([world.render(s, int(rng.choice(world.LIBRARY_SIDES)), rng) for s in scenes])
    accuracy = {}
    for attribute in world.ATTRIBUTES:
        values = world.VALUES[attribute]
        texts = [
            world.caption(dataclasses.replace(scene, **{attribute: value}), language=language)
            for scene in scenes
            for value in values
        ]
        scores = (encoder.embed_texts(texts).reshape(count, len(values), -1) * pictures[:, None]).sum(-1)
        right = [values[best] == getattr(s, attribute) for s, best in zip(scenes, scores.argmax(1), strict=True)]
        accuracy[attribute] = float(np.mean(right))
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "demo.safetensors")
    parser.add_argument("--config", type=Path, default=HERE / "demo.json", help="open_clip model config")
    parser.add_argument("--init", type=Path, help="start from these weights instead of random ones")
    parser.add_argument(
        "--shape-weight", type=int, default=1, help="change the shape this many times as often in hard negatives"
    )
    parser.add_argument(
        "--pairs", action="store_true", help="stage 7: the bilingual vision tower on one- and two-object pictures"
    )
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--english", action="store_true", help="evaluate weights of stages 1-5 (with --eval-only)")
    args = parser.parse_args()
    if args.pairs and not args.eval_only:
        train_pictures(args.steps, args.batch_size, args.lr, args.seed, args.out, args.init, args.shape_weight)
    elif not args.eval_only:
        train(args.steps, args.batch_size, args.lr, args.seed, args.out, args.config, args.init, args.shape_weight)
    evaluate(args.out, english=args.english or not (args.eval_only or args.pairs))


if __name__ == "__main__":
    main()
