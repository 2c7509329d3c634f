"""What a model's cosine similarities mean: its score scale, recorded with the model.

    scale = ScoreScale(logit_scale=110.0, logit_bias=-11.0)   # as a sigmoid-trained model learns them
    scale.match_cosine      # 0.1: from here the model gives a text and a picture even odds

Every model scores with the cosine of two unit vectors, but training puts matching pairs at
different cosines. CLIP's softmax loss only ranks the captions of one batch against each other:
its cosines order results, and no cosine says that a text and a picture match (matching pairs
commonly sit around 0.25 to 0.35). SigLIP's sigmoid loss (SigLIP, SigLIP 2, NLLB-SigLIP) judges
each pair on its own, sigmoid(logit_scale · cosine + logit_bias), so such a model has a cosine of
its own where a pair becomes more likely a match than not; its text–picture cosines sit lower
than CLIP's. A threshold on text–picture scores therefore holds for one model only,
and `match_cosine` is the one threshold that carries over between sigmoid models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["MATCH", "ScoreScale"]

MATCH = "match"  # a minimum score meaning the model's own match_cosine


@dataclass(frozen=True)
class ScoreScale:
    logit_scale: float  # the learned temperature: logits are this times the cosine
    logit_bias: float | None  # the sigmoid loss's learned bias; None for CLIP's softmax

    @property
    def family(self) -> str:
        return "softmax" if self.logit_bias is None else "sigmoid"

    @property
    def match_cosine(self) -> float | None:
        """The text–picture cosine at which the model gives even odds of a match (sigmoid models)."""
        return None if self.logit_bias is None else -self.logit_bias / self.logit_scale

    def match_probability(self, cosine: float) -> float | None:
        """The model's own probability that a text and a picture at this cosine match (sigmoid models)."""
        if self.logit_bias is None:
            return None
        return 1 / (1 + math.exp(-(self.logit_scale * cosine + self.logit_bias)))
