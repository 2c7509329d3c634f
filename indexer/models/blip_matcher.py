"""BLIP's image-text matching model (transformers' BlipForImageTextRetrieval) as a matcher for real
photos: the picture through its ViT once, each caption through BERT with cross-attention to the
picture's patches, and the ITM head's two logits (no match, match) at the first token.

    matcher = open_blip(weights)   # a weights file in the hub's cache, its configuration beside it

Its `match` is the ITM head's softmax probability of "match"; its logit is the log-odds of that
(the difference of the two logits), so that a sigmoid gives the same probability. torch runs it,
float32 on the CPU (bfloat16 is far slower there). The files are read from the cache only: the
download is indexer.models.hub's, before this module is imported.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from indexer.errors import ModelError
from indexer.models import hub
from indexer.models.identity import sha256_file
from indexer.models.matcher_base import Matcher, pairing

__all__ = ["BlipMatcher", "open_blip"]

BATCH = 16  # pictures or pairs per forward pass: bounds the memory of 30 candidates at 384 px
SHA256 = re.compile(r"[0-9a-f]{64}")


@lru_cache(maxsize=2)
def open_blip(weights_path: str) -> BlipMatcher:
    """BLIP from its weights file in the hub's cache (its configuration, tokenizer and image
    processor beside it), checked against the sha256 the hub gave for it: the cache names a
    file it downloaded by that digest. Loaded once per process."""
    path = Path(weights_path)
    found = sha256_file(path)
    recorded = Path(os.path.realpath(path)).name
    if SHA256.fullmatch(recorded) and found != recorded:
        raise ModelError(
            f"the blip matcher's weights ({weights_path}) are not the ones the hub gave (sha256 {found[:12]}, "
            f"expected {recorded[:12]}): delete {path.parent.parent.parent} and run the command again"
        )
    try:
        return BlipMatcher(path.parent, found)
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"the blip matcher in {path.parent} cannot be loaded ({error}): fetch it again") from None


class BlipMatcher(Matcher):
    """BLIP's ITM head on pairs of pictures and captions."""

    name = "blip"
    # BLIP and ALBEF order their retrieval short lists by the ITM logit plus the raw cosine of the
    # dual encoder; at CLIP's logit scale of 100 this weight adds that raw cosine gap. It breaks
    # the ITM head's near-ties and leaves it the decision: unlike the small demo matcher (1.0), a
    # matcher trained on COCO with hard negatives is the better judge of a pair.
    dual_weight = 0.01

    def __init__(self, folder: Path, sha256: str):
        from transformers import BlipForImageTextRetrieval, BlipProcessor

        self.sha256 = sha256
        with hub.client_offline():  # the files are in the cache: transformers must not ask the hub again
            self.processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
            model = BlipForImageTextRetrieval.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        self.model = model.eval()
        size = self.processor.image_processor.size
        self.image_side = int(max(size["height"], size["width"]))
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)

    def describe(self) -> str:
        vision = self.model.config.vision_config
        return f"BLIP image-text matching, {vision.image_size} px, torch"

    def match_logits(self, images: list[Image.Image], texts: list[str]) -> np.ndarray:
        count, rows, repeat = pairing(images, texts)
        tokens = self.processor.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        if repeat:
            ids, mask = ids.expand(count, -1), mask.expand(count, -1)
        with torch.inference_mode():
            patches = torch.cat(
                [self._patches(images[start : start + BATCH]) for start in range(0, len(images), BATCH)]
            )
            logits = torch.cat(
                [
                    self._logits(
                        ids[start : start + BATCH], mask[start : start + BATCH], patches, rows[start : start + BATCH]
                    )
                    for start in range(0, count, BATCH)
                ]
            )
        return (logits[:, 1] - logits[:, 0]).numpy().astype(np.float32)

    def _patches(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor.image_processor([image.convert("RGB") for image in images], return_tensors="pt")
        return self.model.vision_model(pixel_values=pixels["pixel_values"]).last_hidden_state

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor, patches: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        # each picture's patches are read by each of its pairs, the vision tower run once per picture
        context = patches[torch.from_numpy(rows)]
        text = self.model.text_encoder(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=context,
            encoder_attention_mask=torch.ones(context.shape[:2], dtype=torch.long),
        ).last_hidden_state
        return self.model.itm_head(text[:, 0])
