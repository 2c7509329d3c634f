"""Content moderation: score uploads against a policy of concepts and blocklists.

    policy = Policy.load("policy.yaml")
    verdict = engine.moderate(image="upload.jpg", text="its caption", policy=policy)
    verdict.decision   # "block", "review" or "allow"
    verdict.reasons    # ("red triangles: 0.660 ≥ block threshold 0.62 (image 0.660)",)

A concept scores a picture (and any text that comes with it) by cosine similarity to its prompts
in the shared CLIP space; a blocklist matches pictures that look like ones under a folder of the
same index. The decision is the strongest action any of them asks for. A concept with `confirm`
has the pictures in its review band read again by a matcher (indexer.models.matcher) with its
prompts: blocked where the matcher's probability for a prompt reaches CONFIRM_AT, else allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from indexer.errors import PolicyError, QueryError
from indexer.models.matcher import MATCHERS
from search.matching import reading_side
from search.query import Query

if TYPE_CHECKING:
    from indexer.models.matcher import Matcher
    from search.engine import SearchEngine

__all__ = ["Blocklist", "BlocklistMatch", "Concept", "ConceptScore", "Policy", "Verdict", "Weights"]

ACTIONS = ("allow", "review", "block")  # weakest first: a decision is the strongest action asked for
BLOCKLIST_K = 3  # matches reported per blocklist; one is enough to act, a few help the reviewer
CONFIRM_AT = 0.5  # a matcher's probability from which it confirms a concept in its review band: even odds


@dataclass(frozen=True)
class Weights:
    """How much each modality counts in a concept's fused score (renormalised over those present)."""

    image: float = 0.5
    text: float = 0.5


@dataclass(frozen=True)
class Concept:
    name: str
    prompts: tuple[str, ...]
    threshold: float  # fused score at or above → block
    review: float | None  # fused score at or above → review
    weights: Weights
    confirm: bool | str = False  # the review band re-scored by a matcher: True (the index's) or its name


@dataclass(frozen=True)
class Blocklist:
    name: str
    path: str  # a folder prefix or a glob over the index's pictures (SearchEngine.search's `path`)
    threshold: float
    action: str  # "block" or "review"


@dataclass(frozen=True)
class Policy:
    concepts: tuple[Concept, ...]
    blocklists: tuple[Blocklist, ...]

    @classmethod
    def load(cls, path: str | os.PathLike) -> Policy:
        """Read a policy file: YAML for .yaml/.yml, JSON otherwise. Relative blocklist paths are
        relative to the file's folder, so a policy and its blocklists can move together."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PolicyError(f"policy file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as error:
            raise PolicyError(f"cannot read policy file {path}: {error}") from None
        return cls.from_dict(_parse(text, path), source=str(path), base=path.resolve().parent)

    @classmethod
    def from_dict(cls, data: Any, source: str = "policy", base: str | os.PathLike | None = None) -> Policy:
        """A policy from parsed data (an inline policy). Without `base`, blocklist paths must be
        absolute or globs: a relative folder could never match the index's absolute paths."""
        try:
            return _policy(data, Path(base) if base is not None else None)
        except PolicyError as error:
            raise PolicyError(f"{source}: {error}") from None

    @property
    def prompts(self) -> tuple[str, ...]:
        """Every distinct prompt, in order: what is embedded (and cached) once per policy."""
        return tuple(dict.fromkeys(prompt for concept in self.concepts for prompt in concept.prompts))


@dataclass(frozen=True)
class ConceptScore:
    concept: str
    image: float | None  # best prompt similarity of the picture; None without one
    text: float | None  # best prompt similarity of the text; None without one
    score: float | None  # fused; None when the concept gives no weight to what was given
    action: str
    matcher: str | None = None  # the matcher that confirmed (block) or rejected (allow) a review
    match: float | None = None  # its best probability over the concept's prompts


@dataclass(frozen=True)
class BlocklistMatch:
    blocklist: str
    id: int
    path: str
    similarity: float
    action: str


@dataclass(frozen=True)
class Verdict:
    decision: str
    reasons: tuple[str, ...]  # strongest first
    concepts: tuple[ConceptScore, ...]
    matches: tuple[BlocklistMatch, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- reading a policy ----------------------------------------------------------------------


def _parse(text: str, path: Path) -> Any:
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or error
            raise PolicyError(f"{path} is not valid YAML{where}: {problem}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise PolicyError(
            f"{path} is not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None


def _mapping(value: Any, field: str, keys: Sequence[str], required: Sequence[str] = ()) -> Mapping:
    if not isinstance(value, Mapping):
        raise PolicyError(f"{field or 'a policy'} must be a mapping of {', '.join(keys)}, not {value!r}")
    for key in value:
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"expected {', '.join(keys)}"
            raise PolicyError(f"{field + ': ' if field else ''}unknown key '{key}' ({hint})")
    for key in required:
        if key not in value:
            raise PolicyError(f"{field}.{key} is missing")
    return value


def _number(value: Any, field: str, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high or math.isinf(value):
        span = f"from {low:g} to {high:g}" if high < math.inf else f"of {low:g} or more"
        raise PolicyError(f"{field} must be a number {span}, not {value!r}")
    return float(value)


def _weights(value: Any, field: str) -> Weights:
    # A modality left out counts for nothing: `weights: {image: 1}` judges pictures only.
    value = _mapping(value, field, ("image", "text"))
    weights = Weights(*(_number(value.get(name, 0), f"{field}.{name}", 0) for name in ("image", "text")))
    if weights.image + weights.text == 0:
        raise PolicyError(f"{field}: at least one of image, text must be above 0")
    return weights


def _prompts(value: Any, field: str) -> tuple[str, ...]:
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, list) or not prompts:
        raise PolicyError(f"{field} must be a list of one or more texts, not {value!r}")
    if not all(isinstance(prompt, str) and prompt.strip() for prompt in prompts):
        raise PolicyError(f"{field} must hold non-empty texts, not {prompts!r}")
    return tuple(prompt.strip() for prompt in prompts)


def _concept(name: str, value: Any, weights: Weights) -> Concept:
    field = f'concepts["{name}"]'
    keys = ("prompts", "threshold", "review", "weights", "confirm")
    value = _mapping(value, field, keys, required=("prompts", "threshold"))
    threshold = _number(value["threshold"], f"{field}.threshold", -1, 1)
    review = _number(value["review"], f"{field}.review", -1, 1) if value.get("review") is not None else None
    if review is not None and review > threshold:
        raise PolicyError(f"{field}.review ({review:g}) must be at most threshold ({threshold:g})")
    if "weights" in value:
        weights = _weights(value["weights"], f"{field}.weights")
    confirm = value.get("confirm") or False
    if confirm is not False and confirm is not True and confirm not in MATCHERS:
        raise PolicyError(f"{field}.confirm must be true or a matcher ({', '.join(MATCHERS)}), not {confirm!r}")
    if confirm and review is None:
        raise PolicyError(f"{field}.confirm re-scores the review band: give review too")
    return Concept(name, _prompts(value["prompts"], f"{field}.prompts"), threshold, review, weights, confirm)


def _blocklist(name: str, value: Any, base: Path | None) -> Blocklist:
    field = f'blocklists["{name}"]'
    value = _mapping(value, field, ("path", "threshold", "action"), required=("path",))
    path = value["path"]
    if not isinstance(path, str) or not path.strip():
        raise PolicyError(f"{field}.path must be a folder or a glob of pictures in the index, not {path!r}")
    if not os.path.isabs(path) and not path.startswith(("*", "?", "[")):
        if base is None:
            raise PolicyError(f"{field}.path must be an absolute folder or a glob, not {path!r}")
        path = os.path.normpath(base / path)
    threshold = _number(value.get("threshold", 0.95), f"{field}.threshold", -1, 1)
    action = value.get("action", "block")
    if action not in ("block", "review"):
        raise PolicyError(f"{field}.action must be block or review, not {action!r}")
    return Blocklist(name, path, threshold, action)


def _policy(data: Any, base: Path | None) -> Policy:
    data = _mapping(data or {}, "", ("weights", "concepts", "blocklists"))
    weights = _weights(data["weights"], "weights") if "weights" in data else Weights()
    concepts, blocklists = (data.get(key) or {} for key in ("concepts", "blocklists"))
    for key, value in (("concepts", concepts), ("blocklists", blocklists)):
        if not isinstance(value, Mapping):
            raise PolicyError(f"{key} must be a mapping of names to settings, not {value!r}")
    if not concepts and not blocklists:
        raise PolicyError("the policy is empty: give at least one entry under concepts or blocklists")
    return Policy(
        tuple(_concept(str(name), value, weights) for name, value in concepts.items()),
        tuple(_blocklist(str(name), value, base) for name, value in blocklists.items()),
    )


# -- judging -------------------------------------------------------------------------------


def moderate(engine: SearchEngine, items: Sequence[tuple[Any, str | None]], policy: Policy) -> list[Verdict]:
    """A verdict for each (image, text) pair: all pictures embedded in one batch, all texts in another."""
    pairs = [_pair(item, number, len(items)) for number, item in enumerate(items)]
    image_vectors = iter(engine.embed_images([image for image, _ in pairs if image is not None]))
    texts = [text for _, text in pairs if text is not None]
    text_vectors = iter(engine.encoder.embed_texts(texts) if texts else ())
    prompts = engine.embed_prompts(policy.prompts) if policy.prompts else None
    # loaded before any item is judged, so that a matcher that is not to be had fails the call at once
    matchers = {c.name: engine.matcher(None if c.confirm is True else c.confirm) for c in policy.concepts if c.confirm}
    verdicts = []
    for image, text in pairs:
        vectors = {"image": next(image_vectors) if image is not None else None}
        vectors["text"] = next(text_vectors) if text is not None else None
        similarity = {  # modality → prompt → cosine similarity
            modality: dict(zip(policy.prompts, map(float, np.clip(prompts @ vector, -1, 1)), strict=True))
            for modality, vector in vectors.items()
            if vector is not None and prompts is not None
        }
        scores = [_concept_score(concept, similarity) for concept in policy.concepts]
        if image is not None:
            scores = _confirmed(engine, policy.concepts, scores, matchers, image)
        matches = _matches(engine, policy.blocklists, vectors["image"]) if image is not None else []
        verdicts.append(_verdict(policy, scores, matches))
    return verdicts


def _pair(item: Any, number: int, count: int) -> tuple[Any, str | None]:
    where = f"item {number + 1} of {count}: " if count > 1 else ""
    if not isinstance(item, Sequence) or isinstance(item, (str, bytes)) or len(item) != 2:
        raise QueryError(f"{where}give an (image, text) pair to moderate, not {item!r}")
    image, text = item
    if text is not None and not isinstance(text, str):
        raise QueryError(f"{where}the text to moderate must be a string, not {text!r}")
    text = text if text and text.strip() else None  # a form's empty caption is no caption
    if image is None and text is None:
        raise QueryError(f"{where}nothing to moderate: give an image, a text or both")
    return image, text


def _concept_score(concept: Concept, similarity: dict[str, dict[str, float]]) -> ConceptScore:
    best = {modality: max(row[prompt] for prompt in concept.prompts) for modality, row in similarity.items()}
    weights = {modality: getattr(concept.weights, modality) for modality in best}
    total = sum(weights.values())
    score = sum(weights[modality] * best[modality] for modality in best) / total if total else None
    if score is not None and score >= concept.threshold:
        action = "block"
    elif score is not None and concept.review is not None and score >= concept.review:
        action = "review"
    else:
        action = "allow"
    return ConceptScore(concept.name, best.get("image"), best.get("text"), score, action)


def _confirmed(
    engine: SearchEngine,
    concepts: Sequence[Concept],
    scores: list[ConceptScore],
    matchers: dict[str, Matcher],
    image: Any,
) -> list[ConceptScore]:
    """The scores, those in the review band of a concept with `confirm` moved to block or allow by
    its matcher's best probability over the concept's prompts."""
    confirmed, pictures = [], {}
    for concept, score in zip(concepts, scores, strict=True):
        matcher = matchers.get(concept.name)
        if matcher is None or score.action != "review":
            confirmed.append(score)
            continue
        side = reading_side(matcher)
        if side not in pictures:
            pictures[side] = engine.read_picture(image, side)
        best = float(matcher.match([pictures[side]], list(concept.prompts)).max())
        action = "block" if best >= CONFIRM_AT else "allow"
        confirmed.append(dataclasses.replace(score, action=action, matcher=matcher.name, match=best))
    return confirmed


def _matches(engine: SearchEngine, blocklists: Sequence[Blocklist], vector: np.ndarray) -> list[BlocklistMatch]:
    query = Query.vector(vector)
    return [
        BlocklistMatch(blocklist.name, hit.id, hit.path, hit.score, blocklist.action)
        for blocklist in blocklists
        for hit in engine.search(query, k=BLOCKLIST_K, path=blocklist.path, min_score=blocklist.threshold)
    ]


def _verdict(policy: Policy, scores: list[ConceptScore], matches: list[BlocklistMatch]) -> Verdict:
    reasons = [
        (score.action, _concept_reason(concept, score))
        for concept, score in zip(policy.concepts, scores, strict=True)
        if score.action != "allow" or score.matcher is not None  # a rejection is recorded too
    ]
    reasons += [(m.action, f"looks like '{m.blocklist}' item {m.id} {m.path} ({m.similarity:.3f})") for m in matches]
    reasons.sort(key=lambda pair: -ACTIONS.index(pair[0]))  # strongest first, else in policy order
    decision = reasons[0][0] if reasons else "allow"
    return Verdict(decision, tuple(reason for _, reason in reasons), tuple(scores), tuple(matches))


def _concept_reason(concept: Concept, score: ConceptScore) -> str:
    given = [
        f"{name} {value:.3f}" for name, value in (("image", score.image), ("text", score.text)) if value is not None
    ]
    if score.matcher is not None:
        verb, sign = ("confirmed", "≥") if score.action == "block" else ("rejected", "<")
        return (
            f"{concept.name}: {score.score:.3f} in the review band [{concept.review:g}, {concept.threshold:g}) "
            f"({', '.join(given)}), {verb} by the {score.matcher} matcher ({score.match:.3f} {sign} {CONFIRM_AT:g})"
        )
    bar = concept.threshold if score.action == "block" else concept.review
    return f"{concept.name}: {score.score:.3f} ≥ {score.action} threshold {bar:g} ({', '.join(given)})"
