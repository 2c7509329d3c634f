"""Matchers: models that read a picture and a caption together and give the probability that the
caption is true of the picture. The search engine re-ranks the dual encoder's short list with one.

    matcher = load_matcher("demo")
    matcher.match(pictures, texts)   # (n,) probabilities, one per (picture, text) pair

`demo` is a small cross-attention model trained by data/train_matcher.py on the demo world's
one- and two-object scenes: text tokens attend to the picture's patches, as in BLIP's
image-text matching head. It is small enough (under a million parameters) that its forward pass
runs in numpy here, without torch or ONNX Runtime, so a query process re-ranks 30 candidates in
milliseconds and loads nothing heavy; data/train_matcher.py is its recipe,
data/matcher_model.py the torch twin it is trained as, and tests/test_rerank.py holds the two to the same outputs.

`blip` is BLIP's image-text matching model for real photos (indexer.models.blip_matcher, torch
and transformers), its weights in the Hugging Face cache and downloaded once like a CLIP
model's (indexer.models.hub). It is the default for indexes of real models once it is on this
machine; before that, asking for it by name is what downloads it.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.errors import ModelError, QueryError
from indexer.models import hub
from indexer.models.identity import DEMO_MODEL, _demo_dir, sha256_file
from indexer.models.matcher_base import Matcher, pairing
from indexer.models.pixels import Preprocess
from indexer.models.tokenizer import ClipTokenizer

__all__ = [
    "BLIP_FILES",
    "MATCHERS",
    "DemoMatcher",
    "Matcher",
    "MatcherConfig",
    "available_matchers",
    "clause_ids",
    "demo_tokenizer",
    "load_matcher",
    "open_matcher",
    "position_table",
]

MATCHERS = ("demo", "blip")  # the matchers clipseek knows by name, the demo world's default first
# BLIP's image-text matching (ViT-B/16 at 384 px, BERT-base with cross-attention, fine-tuned on
# COCO): its weights (safetensors where the repository has them, else PyTorch's file, read by
# torch's weights-only unpickler, which runs no code), after the files that configure it.
BLIP_FILES = hub.HubFiles(
    "Salesforce/blip-itm-base-coco",
    ("model.safetensors", "pytorch_model.bin"),
    "the blip matcher (Salesforce/blip-itm-base-coco)",
    "blip",
    before=(
        "config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
    ),
    checkpoint=False,
)
BLIP_SIZE = "895 MB"
PADDING, UNKNOWN = 0, 1  # mapped ids before the word pieces the matcher knows


@dataclass(frozen=True)
class MatcherConfig:
    name: str
    width: int
    heads: int
    image_layers: int
    fusion_layers: int
    patch_size: int
    image_size: int
    context_length: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    clause_break: int  # the CLIP token id ("and") that starts a caption's next clause
    clauses: int  # clause embeddings: a token in the n-th clause (from 0) gets the min(n, clauses - 1)-th
    # How much of the dual encoder's evidence (its logit scale × cosine) is added to the matcher's
    # logit when a short list is re-ranked, as ALBEF and BLIP rank theirs: the matcher decides
    # between candidates the dual encoder finds alike, and does not overrule it where it is sure.
    dual_weight: float
    tokens: tuple[int, ...] = field(default=())  # the CLIP token ids it knows; others read as one unknown piece
    sha256: str | None = None  # of the weights file: the matcher's identity, checked when it loads

    @classmethod
    def load(cls, path: str | Path) -> MatcherConfig:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})


def clause_ids(config: MatcherConfig, tokens: np.ndarray) -> np.ndarray:
    """Which clause of its caption each mapped token is in ("a red circle on the left | and a blue
    square ..."): a cue to which words describe the same object, which a small model trained
    briefly does not find from positions alone."""
    mapped = config.tokens.index(config.clause_break) + 2
    return np.minimum(np.cumsum(tokens == mapped, axis=1), config.clauses - 1)


def preprocess_for(config: MatcherConfig) -> Preprocess:
    return Preprocess((config.image_size, config.image_size), config.mean, config.std)


@lru_cache
def _clip_tokenizer(context_length: int) -> ClipTokenizer:
    # open_clip's own vocabulary file, found without importing open_clip (which imports torch)
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ModelError("the demo matcher reads open_clip's vocabulary: install open_clip_torch")
    return ClipTokenizer(Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz", context_length)


def demo_tokenizer(config: MatcherConfig):
    """texts → (n, context_length) int64: the demo CLIP's token ids, mapped to the matcher's own."""
    clip = _clip_tokenizer(config.context_length)
    known = {token: number + 2 for number, token in enumerate(config.tokens)}

    def tokenize(texts: list[str]) -> np.ndarray:
        out = np.full((len(texts), config.context_length), PADDING, np.int64)
        for row, text in enumerate(texts):
            ids = [clip.start, *clip.encode(text), clip.end][: config.context_length]
            ids[-1] = clip.end
            out[row, : len(ids)] = [known.get(i, UNKNOWN) for i in ids]
        return out

    return tokenize


def matcher_config() -> Path:
    """The bundled demo matcher's config (beside the demo CLIP's)."""
    return _demo_dir() / "matcher.json"


def matcher_weights() -> Path:
    return _demo_dir() / "matcher.safetensors"


def suits(name: str, architecture: str) -> bool:
    """Whether the matcher `name` reads the pictures of an index made by `architecture`: the demo
    matcher knows only the demo world; BLIP reads any picture (on the demo world, knowing
    nothing of it in particular)."""
    return architecture == DEMO_MODEL if name == "demo" else True


def available_matchers(architecture: str, cache_dir: str | Path | None = None) -> list[str]:
    """The matchers on this machine that suit an index made by `architecture`, its default first
    (MATCHERS' order): the demo matcher for the demo model, BLIP for real models once its weights
    are in the cache."""
    here = {"demo": matcher_weights().is_file(), "blip": hub.cached(BLIP_FILES, cache_dir) is not None}
    return [name for name in MATCHERS if suits(name, architecture) and here[name]]


def none_available(architecture: str) -> str:
    """What to do when no matcher for `architecture` is on this machine."""
    if architecture == DEMO_MODEL:
        return "the demo matcher's weights are missing: reinstall clipseek"
    return (
        f"no matcher for {architecture} is on this machine: --matcher blip downloads BLIP's image-text "
        f"matching model ({BLIP_SIZE}) once, or `clipseek models fetch blip` fetches it for later"
    )


def load_matcher(
    name: str,
    architecture: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    offline: bool | None = None,
    fetch: bool = True,
) -> Matcher:
    """The matcher called `name`, checked against its recorded identity (the sha256 of its weights)
    and, given the index's `architecture`, against the pictures it suits. BLIP's weights come from
    the hub's cache, downloaded now unless offline (ModelError at once, with what to do) or told
    not to `fetch` (QueryError: the caller asked for what this process does not download)."""
    if name not in MATCHERS:
        raise QueryError(f"unknown matcher {name!r}: clipseek knows {', '.join(MATCHERS)}")
    if architecture is not None and not suits(name, architecture):
        available = available_matchers(architecture, cache_dir)
        advice = f"use --matcher {available[0]}" if available else none_available(architecture)
        raise QueryError(f"the {name} matcher was trained on the demo world only, not for {architecture}: {advice}")
    if name == "demo":
        return open_matcher(str(matcher_config()), str(matcher_weights()))
    if importlib.util.find_spec("transformers") is None:
        raise ModelError("the blip matcher runs with the transformers package: pip install 'clipseek[hf]'")
    if not fetch and hub.cached(BLIP_FILES, cache_dir) is None:
        raise QueryError(
            f"the blip matcher is not on this machine, and it is not downloaded on request: run "
            f"`clipseek models fetch blip` ({BLIP_SIZE}) where this runs"
        )
    weights = hub.weights_file(BLIP_FILES, cache_dir, offline)
    from indexer.models.blip_matcher import open_blip  # torch and transformers: loaded when BLIP re-ranks

    return open_blip(str(weights))


@lru_cache(maxsize=4)
def open_matcher(config_path: str, weights_path: str) -> DemoMatcher:
    """A matcher from its config and weights files (loaded once per process)."""
    from safetensors.numpy import load_file

    config = MatcherConfig.load(config_path)
    expected = config.sha256
    if not Path(weights_path).is_file():
        raise ModelError(f"the {config.name} matcher's weights are missing ({weights_path}): reinstall clipseek")
    found = sha256_file(weights_path)
    if expected is not None and found != expected:
        raise ModelError(
            f"the {config.name} matcher's weights ({weights_path}) are not the ones its config names "
            f"(sha256 {found[:12]}, expected {expected[:12]}): reinstall clipseek"
        )
    weights = {name: array.astype(np.float32) for name, array in load_file(weights_path).items()}
    return DemoMatcher(config, weights, found)


def position_table(grid: int, width: int) -> np.ndarray:
    """Fixed 2-D sine-cosine positions of a grid × grid of patches, (grid², width) float32: added
    to the learned ones, so that where a patch is is known from the first step of training."""
    quarter = width // 4
    frequencies = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, columns = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    parts = [f(axis.reshape(-1, 1) * frequencies) for axis in (rows, columns) for f in (np.sin, np.cos)]
    return np.concatenate(parts, axis=1).astype(np.float32)


def _linear(x: np.ndarray, weights: dict, name: str) -> np.ndarray:
    # one 2-D product: numpy multiplies a stack by a transposed matrix up to 6 times slower (30 pictures' 144 patches)
    weight = weights[f"{name}.weight"]
    return (x.reshape(-1, x.shape[-1]) @ weight.T).reshape(*x.shape[:-1], -1) + weights[f"{name}.bias"]


def _layer_norm(x: np.ndarray, weights: dict, name: str) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * weights[f"{name}.weight"] + weights[f"{name}.bias"]


def _gelu(x: np.ndarray) -> np.ndarray:  # the tanh form, as trained
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


class DemoMatcher(Matcher):
    """The bundled demo matcher, run in numpy."""

    def __init__(self, config: MatcherConfig, weights: dict[str, np.ndarray], sha256: str):
        self.config, self.weights, self.sha256 = config, weights, sha256
        self.name, self.image_side, self.dual_weight = config.name, config.image_size, config.dual_weight
        self.preprocess = preprocess_for(config)
        self.tokenize = demo_tokenizer(config)

    def describe(self) -> str:
        return f"cross-attention, {self.config.image_size} px"

    def match_logits(self, images: list[Image.Image], texts: list[str]) -> np.ndarray:
        count, rows, repeat = pairing(images, texts)
        patches = self.encode_images(images)
        tokens = self.tokenize(texts)
        tokens = np.repeat(tokens, count, axis=0) if repeat else tokens
        return self.logits(patches, tokens, rows)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        w, c, p = self.weights, self.config, self.config.patch_size
        pixels = np.stack([self.preprocess(image) for image in images])
        b, grid = len(pixels), c.image_size // p
        patches = pixels.reshape(b, 3, grid, p, grid, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, -1)
        x = _linear(patches, w, "patch_embed") + w["image_pos"] + position_table(grid, c.width)
        for n in range(c.image_layers):
            name = f"image_blocks.{n}"
            y = _layer_norm(x, w, f"{name}.ln1")
            x = x + self._attention(y, y, None, None, f"{name}.attn", None)
            x = x + self._mlp(_layer_norm(x, w, f"{name}.ln2"), f"{name}.mlp")
        return _layer_norm(x, w, "image_ln")

    def logits(self, patches: np.ndarray, tokens: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The match logit of each text row, read against the picture patches[rows[i]]."""
        w = self.weights
        tokens = tokens[:, : int((tokens != PADDING).sum(1).max())]
        mask = tokens != PADDING
        x = w["token_embed.weight"][tokens] + w["text_pos"][: tokens.shape[1]]
        x = x + w["clause_embed.weight"][clause_ids(self.config, tokens)]
        for n in range(self.config.fusion_layers):
            name = f"fusion_blocks.{n}"
            y = _layer_norm(x, w, f"{name}.ln1")
            x = x + self._attention(y, y, mask, None, f"{name}.self_attn", None)
            y = _layer_norm(x, w, f"{name}.ln2")
            x = x + self._attention(y, patches, None, rows, f"{name}.cross_attn", w[f"{name}.cross_pos"])
            x = x + self._mlp(_layer_norm(x, w, f"{name}.ln3"), f"{name}.mlp")
        return _linear(_layer_norm(x[:, 0], w, "final_ln"), w, "head")[:, 0]

    def _attention(self, x, context, key_mask, rows, name, key_position) -> np.ndarray:
        # key_position: added to every context row's keys (the cross-attention's patch positions)
        w, heads = self.weights, self.config.heads
        b, t, width = x.shape

        def split(y):
            return y.reshape(y.shape[0], -1, heads, width // heads).transpose(0, 2, 1, 3)

        k = _linear(context, w, f"{name}.k")
        q, k, v = (
            split(_linear(x, w, f"{name}.q")),
            split(k if key_position is None else k + key_position),
            split(_linear(context, w, f"{name}.v")),
        )
        if rows is not None:  # keys and values projected once per picture, read by each of its pairs
            k, v = k[rows], v[rows]
        logits = q @ k.transpose(0, 1, 3, 2) / np.float32(math.sqrt(width // heads))
        if key_mask is not None:
            logits = np.where(key_mask[:, None, None, :], logits, np.float32(-np.inf))
        logits = np.exp(logits - logits.max(-1, keepdims=True))
        out = (logits / logits.sum(-1, keepdims=True)) @ v
        return _linear(out.transpose(0, 2, 1, 3).reshape(b, t, width), w, f"{name}.o")

    def _mlp(self, x: np.ndarray, name: str) -> np.ndarray:
        return _linear(_gelu(_linear(x, self.weights, f"{name}.fc")), self.weights, f"{name}.proj")
