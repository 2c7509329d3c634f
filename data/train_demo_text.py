"""The recipe that gives the bundled demo CLIP a bilingual text tower (English and Chinese).

    .venv/bin/python data/train_demo_text.py --tokenizer-only     # data/demo_tokenizer/ (seconds)
    git show 2bada42:data/demo.safetensors > stage5.safetensors   # the English model (data/train_demo.py)
    .venv/bin/python data/train_demo_text.py --teacher stage5.safetensors   # the weights (about 20 min)
    .venv/bin/python data/train_demo.py --eval-only                # evaluate the committed weights

Locked-image tuning: the English model's vision tower (stages 1-5 of data/train_demo.py) is kept
as it is, and a new text tower learns to put English and Chinese captions where the English
model's own text tower puts the English caption of the same scene: its vectors already sit
beside the pictures they describe (held-out text→image R@1 1.000 with all five attributes), so
no picture needs to be drawn or embedded.

Tokenizer: a byte-pair tokenizer trained with the `tokenizers` library on captions of the demo
world in both languages (BERT's normaliser: lower case, each Chinese character a word of its
own, so that a query phrased unlike any caption still reads character by character), saved as
tokenizer.json with a tokenizer_config.json as Hugging Face models ship them. clipseek reads it
with indexer/models/hf_tokenizer.py, as it reads the real multilingual models' tokenizers.

Text tower: the English tower's shape (3 layers, width 128, context 32), pooled at the end
token. It starts as a copy of the English tower: each English word's embedding is the English
model's embedding of that word, and each Chinese character of a short glossary (红 → red,
圆 → circle, 左 → left…) starts at its English word's, the rest at random; so English captions
embed exactly as before from the first step. Batches are made as in data/train_demo.py (groups
of four scenes, three of them one attribute away from the first; captions naming every
attribute 60% of the time, else a random subset), each caption in Chinese 70% of the time.
Loss: one minus the cosine to the English model's vector of an English caption of the same
scene and attributes, plus a contrastive loss against every target of the batch (targets
naming the same attributes count as positives). AdamW, lr 5e-4, linear warm-up then cosine
decay, 300 steps of batch 128; numpy's generator seeded with (seed, step) draws each batch,
so the same torch build and thread count reproduce the same weights. Saved as float16, with
the vision tower and the temperature unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import string
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from train_demo import ENGLISH, GROUP, OPTIONAL, evaluate, register_english, variant  # noqa: E402

from indexer import demo_world as world  # noqa: E402
from indexer.models.encoder import text_forward  # noqa: E402
from indexer.models.hf_tokenizer import HfTokenizer  # noqa: E402
from indexer.models.tokenizer import CLEANERS  # noqa: E402

TOKENIZER = HERE / "demo_tokenizer"
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")  # ids 0-3: padding 0, the tower pools at [SEP] (eos_id 3)
# Chinese characters that start at an English word's embedding (the rest start at random)
GLOSSARY = {
    "红": "red", "黄": "yellow", "绿": "green", "蓝": "blue", "紫": "purple", "白": "white",
    "大": "large", "小": "small", "圆": "circle", "方": "square", "三": "triangle", "角": "triangle",
    "星": "star", "十": "cross", "字": "cross", "左": "left", "右": "right", "上": "top", "顶": "top",
    "下": "bottom", "底": "bottom", "中": "centre", "央": "centre", "草": "grass", "沙": "sand",
    "滩": "beach", "水": "water", "海": "sea", "夜": "night", "空": "sky", "背": "background", "景": "background",
}  # fmt: skip
CHINESE = 0.7  # of the captions in a batch
CLEAN = "whitespace"  # open_clip's cleaning of the texts (its default for Hugging Face tokenizers)


def corpus(count: int = 20_000, seed: int = 5) -> list[str]:
    """Captions in both languages, with random phrasings and subsets of attributes."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        scene = world.random_scene(rng)
        keep = ("shape", *(a for a in OPTIONAL if rng.random() < 0.6))
        texts += [world.caption(scene, rng, keep, language) for language in ("en", "zh")]
    # as the tokenizer will see them: open_clip's cleaning makes "，" a ","
    return [CLEANERS[CLEAN](text) for text in texts]


def build_tokenizer(folder: Path, context_length: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(handle_chinese_chars=True, strip_accents=False, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=list(SPECIAL), initial_alphabet=list(string.ascii_lowercase + string.digits)
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context_length,
        **dict(zip(("pad_token", "unk_token", "cls_token", "sep_token"), SPECIAL, strict=True)),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n")
    print(f"{folder}: {tokenizer.get_vocab_size()} tokens")
    return tokenizer


def student_from(teacher: torch.nn.Module, config: Path, vocabulary: dict[str, int], seed: int) -> torch.nn.Module:
    """The bilingual model, starting as the English one with embeddings for the new vocabulary."""
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    student = open_clip.create_model(config.stem)
    kept = {name: value for name, value in teacher.state_dict().items() if name != "token_embedding.weight"}
    student.load_state_dict(kept, strict=False)
    english = open_clip.get_tokenizer(ENGLISH)
    old = teacher.token_embedding.weight.detach()
    new = student.token_embedding.weight.data
    new.normal_(0, 0.02)
    for token, number in vocabulary.items():
        word = {"[CLS]": "<start_of_text>", "[SEP]": "<end_of_text>"}.get(token) or GLOSSARY.get(token, token)
        if token in ("[PAD]", "[UNK]") or not (word.isascii() and word.replace("<", "").replace(">", "").isalnum()):
            continue
        if word.startswith("<"):
            new[number] = old[english.encoder[word]]
        else:  # the word's CLIP pieces (one piece for every word of the captions), averaged
            pieces = english.encode(word)
            new[number] = old[pieces].mean(0)
    return student


def batch(step: int, size: int, seed: int):
    """Captions (Chinese or English), the English captions whose teacher vectors are their targets,
    and positives[i, j]: caption i names the same attributes as target j."""
    rng = np.random.default_rng([seed, step])
    scenes = []
    while len(scenes) < size:
        group = [world.random_scene(rng)]
        group += [variant(group[0], rng) for _ in range(GROUP - 1)]
        scenes.extend(group)
    scenes = scenes[:size]
    keeps = [
        ("shape", *(OPTIONAL if rng.random() < 0.6 else tuple(a for a in OPTIONAL if rng.random() < 0.5)))
        for _ in scenes
    ]
    targets = [world.caption(s, rng, keep) for s, keep in zip(scenes, keeps, strict=True)]
    texts = [
        world.caption(s, rng, keep, "zh") if rng.random() < CHINESE else target
        for s, keep, target in zip(scenes, keeps, targets, strict=True)
    ]
    named = [{a: getattr(s, a) for a in keep} for s, keep in zip(scenes, keeps, strict=True)]
    positives = torch.tensor([[a == b for b in named] for a in named], dtype=torch.float32)
    return texts, targets, positives


def train(args) -> None:
    register_english(args.config)
    teacher = open_clip.create_model(ENGLISH)
    teacher.load_state_dict({name: tensor.float() for name, tensor in load_file(str(args.teacher)).items()})
    teacher.eval()
    english = open_clip.get_tokenizer(ENGLISH)
    context = json.loads(args.config.read_text())["text_cfg"]["context_length"]
    tokenizer = HfTokenizer(args.tokenizer, context, CLEAN)
    vocabulary = tokenizer.tokenizer.get_vocab()
    student = student_from(teacher, args.config, vocabulary, args.seed)
    for parameter in [*student.visual.parameters(), student.logit_scale]:
        parameter.requires_grad_(False)  # the pictures' side is locked
    trained = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    decay = [p for n, p in trained if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in trained if not (p.ndim >= 2 and "embedding" not in n)]
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98)
    )
    scale = teacher.logit_scale.exp().item()
    warmup = max(1, args.steps // 20)
    started = time.time()
    student.train()
    for step in range(args.steps):
        factor = (
            (step + 1) / warmup
            if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (args.steps - warmup)))
        )
        for group in optimiser.param_groups:
            group["lr"] = args.lr * factor
        texts, targets, positives = batch(step, args.batch_size, args.seed)
        with torch.no_grad():
            ids = english(targets)
            wanted = text_forward(teacher, "argmax", ids[:, : int(ids.argmax(1).max()) + 1])
        tokens = torch.from_numpy(tokenizer(texts))  # cut after the longest text: the attention is causal
        got = text_forward(student, "eos", tokens[:, : int((tokens != 0).sum(1).max())])
        distance = (1 - (got * wanted).sum(1)).mean()
        logits = scale * got @ wanted.T
        contrast = -(F.log_softmax(logits, dim=1) * positives / positives.sum(1, keepdim=True)).sum(1).mean()
        loss = distance + args.contrast * contrast
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}/{args.steps}  1-cos {distance.item():.4f}  contrast {contrast.item():.4f}"
                f"  {time.time() - started:6.0f}s",
                flush=True,
            )
    state = {name: tensor.detach().half().contiguous() for name, tensor in student.state_dict().items()}
    save_file(state, str(args.out))
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) after {time.time() - started:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, help="the English model's weights (stage 5 of data/train_demo.py)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--contrast", type=float, default=0.1, help="weight of the contrastive loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "demo.safetensors")
    parser.add_argument("--config", type=Path, default=HERE / "demo.json", help="open_clip model config")
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    parser.add_argument("--tokenizer-only", action="store_true", help="train the tokenizer into --tokenizer")
    args = parser.parse_args()
    config = json.loads(args.config.read_text())
    if args.tokenizer_only:
        size = build_tokenizer(args.tokenizer, config["text_cfg"]["context_length"]).get_vocab_size()
        if size != config["text_cfg"]["vocab_size"]:
            print(f"now set text_cfg.vocab_size to {size} in {args.config}")
        return
    if args.teacher is None:
        parser.error("--teacher is needed to train")
    train(args)
    evaluate(args.out)


if __name__ == "__main__":
    main()
