"""The models worth choosing for real photos, as data: `clipseek models` lists them.

Each row names an open_clip architecture and pretrained tag with what a user weighs: languages,
embedding size, weights, and the published zero-shot ImageNet-1k top-1. The figures come from
open_clip's results table (docs/openclip_results.csv in mlfoundations/open_clip: its `params (M)`
and `ImageNet 1k` columns), except MobileCLIP's, which that table lacks: those are from Apple's
model card (apple/MobileCLIP-S1-OpenCLIP). The Hugging Face repository of each tag is kept here
too, so that the weights can be found in the cache, or fetched, without importing torch to read
open_clip's own table; tests/test_first_run.py holds both tables to agreeing.
"""

from __future__ import annotations

from dataclasses import dataclass

from indexer.models.identity import DEFAULT_MODEL, DEFAULT_PRETRAINED

OPEN_CLIP_RESULTS = "open_clip docs/openclip_results.csv"
MOBILECLIP_CARD = "Apple's MobileCLIP model card"


@dataclass(frozen=True)
class ModelChoice:
    architecture: str
    pretrained: str
    role: str  # why a user would pick it
    languages: str
    dim: int
    image_size: int
    params_m: float  # millions of parameters, image and text towers together
    imagenet_top1: float  # published zero-shot ImageNet-1k top-1, in %
    source: str  # where imagenet_top1 and params_m are published
    hf_repo: str  # where open_clip fetches the weights

    @property
    def name(self) -> str:
        return f"{self.architecture}/{self.pretrained}"

    @property
    def weights_bytes(self) -> int:
        """The size of the weights at 4 bytes a parameter (float32); a hub file in float16 is half."""
        return int(self.params_m * 4e6)


CHOICES: tuple[ModelChoice, ...] = (
    ModelChoice(
        DEFAULT_MODEL,
        DEFAULT_PRETRAINED,
        "default",
        "English",
        512,
        224,
        151.28,
        66.56,
        OPEN_CLIP_RESULTS,
        "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
    ),
    ModelChoice(
        "ViT-B-32",
        "datacomp_xl_s13b_b90k",
        "same cost, better",
        "English",
        512,
        224,
        151.28,
        69.17,
        OPEN_CLIP_RESULTS,
        "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K",
    ),
    ModelChoice(
        "MobileCLIP-S1",
        "datacompdr",
        "smaller, more accurate",
        "English",
        512,
        256,
        84.9,
        72.6,
        MOBILECLIP_CARD,
        "apple/MobileCLIP-S1-OpenCLIP",
    ),
    ModelChoice(
        "ViT-B-16",
        "datacomp_xl_s13b_b90k",
        "quality",
        "English",
        512,
        224,
        149.62,
        73.49,
        OPEN_CLIP_RESULTS,
        "laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K",
    ),
    ModelChoice(
        "ViT-B-16-SigLIP",
        "webli",
        "quality",
        "English",
        768,
        224,
        203.16,
        76.04,
        OPEN_CLIP_RESULTS,
        "timm/ViT-B-16-SigLIP",
    ),
    ModelChoice(
        "ViT-L-14",
        "datacomp_xl_s13b_b90k",
        "best on a CPU (slow)",
        "English",
        768,
        224,
        427.62,
        79.21,
        OPEN_CLIP_RESULTS,
        "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K",
    ),
    ModelChoice(
        "xlm-roberta-base-ViT-B-32",
        "laion5b_s13b_b90k",
        "multilingual",
        "about 100 (XLM-RoBERTa)",
        512,
        224,
        366.12,
        62.36,
        OPEN_CLIP_RESULTS,
        "laion/CLIP-ViT-B-32-xlm-roberta-base-laion5B-s13B-b90k",
    ),
    ModelChoice(
        "ViT-B-16-SigLIP-i18n-256",
        "webli",
        "multilingual",
        "many (WebLI)",
        768,
        256,
        370.63,
        75.13,
        OPEN_CLIP_RESULTS,
        "timm/ViT-B-16-SigLIP-i18n-256",
    ),
)


def choice_of(architecture: str, pretrained: str | None = None) -> ModelChoice | None:
    """The listed row of an architecture and tag (its first listed tag when `pretrained` is None)."""
    for choice in CHOICES:
        if choice.architecture == architecture and pretrained in (None, choice.pretrained):
            return choice
    return None
