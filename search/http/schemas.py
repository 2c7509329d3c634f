"""The HTTP API's request bodies: validated by pydantic, so a malformed request is a 422 with its reason.

Pictures travel as base64 of the file's bytes (JSON cannot carry bytes); `POST /search/image`
takes a multipart upload instead, for curl and forms.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from indexer.errors import QueryError
from search.engine import LABEL_TEMPLATE

MAX_TEXT = 2000  # characters; CLIP reads at most 77 tokens, so longer texts are mistakes or abuse
MAX_TERMS = 16
MAX_BATCH = 64  # pictures per classify or moderate request
MAX_LABELS = 1000  # labels per classify request: each is one text to embed
MAX_NAME = 200  # characters in a collection's, a concept's or a blocklist's name
MAX_PATH = 4096  # characters in a path or a glob (Linux's PATH_MAX)
MAX_CONCEPTS = 64  # concepts or blocklists in an inline policy
MAX_PROMPTS = 32  # prompts per concept
MAX_RERANK = 200  # candidates one request may have re-scored: each is a picture read and a matcher pass
# The largest id or count accepted: the largest integer every JSON client reads exactly (JavaScript's
# numbers; OpenAPI states bounds as doubles too), far beyond any real index or count, within SQLite's ids.
MAX_INTEGER = 2**53 - 1


def whole(ge: int, le: int = MAX_INTEGER) -> Any:
    """The type of an id or a count from `ge` to `le`, for which JSON's true and false are no numbers."""
    # The bounds come before the validator: after it, pydantic cannot state them in the JSON schema.
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_not_bool)]


def _not_bool(value: Any) -> Any:
    # pydantic reads JSON true as 1; a client sending true for an id or a count has made a mistake.
    if isinstance(value, bool):
        raise ValueError("a number is needed, not true or false")
    return value


ItemId = whole(1)


def _label_template(template: str) -> str:
    # The engine checks the same rule; here a client learns it as a 422 naming the field.
    if not re.match(LABEL_TEMPLATE, template):
        raise ValueError("the label goes where {} is, and no other brace may appear (no {0}, {name} or {:>9})")
    return template


def image_bytes(encoded: str) -> bytes:
    """The bytes of a base64 picture; a data: URL prefix (as browsers make them) is allowed."""
    if encoded.startswith("data:") and "," in encoded:
        encoded = encoded.split(",", 1)[1]
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise QueryError("the picture is not valid base64") from error


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def given(name: str, kind: str, **rules: Any) -> dict[str, Any]:
    """The JSON schema of an object whose field `name` is given and not null (null counts as left out)."""
    return {"required": [name], "properties": {name: {"type": kind, **rules}}}


_TEXT, _IMAGE, _ITEM = given("text", "string"), given("image", "string"), given("item", "integer")
_TERMS = {"required": ["terms"], "properties": {"terms": {"type": "array", "minItems": 1}}}


class Term(_Strict):
    """One weighted part of a query: exactly one of text, image (base64) or item."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [_TEXT, _IMAGE, _ITEM]})

    text: str | None = Field(None, max_length=MAX_TEXT)
    image: str | None = None
    item: ItemId | None = None
    weight: float = Field(1.0, ge=-100, le=100)

    @model_validator(mode="after")
    def _one_kind(self) -> Term:
        given = [name for name in ("text", "image", "item") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"a term has exactly one of text, image or item (got {', '.join(given) or 'none'})")
        return self


class FilterFields(_Strict):
    modality: Literal["image", "text"] = "image"
    k: whole(1) = Field(10, description="How many hits; more than the server's cap is capped.")
    offset: whole(0, 100_000) = 0
    path: str | None = Field(None, max_length=MAX_PATH, description="A folder prefix or a glob on picture paths.")
    collection: str | None = Field(None, max_length=MAX_NAME)
    date_from: str | None = Field(None, max_length=10, description="YYYY-MM-DD, inclusive.")
    date_to: str | None = Field(None, max_length=10, description="YYYY-MM-DD, inclusive.")
    min_score: Annotated[float, Field(ge=-1, le=1)] | Literal["match"] | None = Field(
        None,
        description="A cosine, or 'match': from where the model (sigmoid-trained) sees a text and a picture match.",
    )
    rerank: whole(1, MAX_RERANK) | None = Field(
        None,
        description="Re-score the first N candidates with a matcher and order them by its logit with the dual "
        "encoder's evidence added; each gains `match`, the matcher's own probability.",
    )
    matcher: str | None = Field(
        None, max_length=MAX_NAME, description="The matcher of `rerank` (default: the index's)."
    )

    def filters(self) -> dict[str, Any]:
        return self.model_dump(
            include={"path", "collection", "date_from", "date_to", "min_score", "offset", "rerank", "matcher"}
        )


class SearchParams(FilterFields):
    """A query in a URL: a text, a stored item, or both (added together)."""

    _wanted: ClassVar[str] = "a text or an item"
    text: str | None = Field(None, max_length=MAX_TEXT)
    item: ItemId | None = None

    def all_terms(self) -> list[Term]:
        """The query's parts, each weighted 1 (a text with a picture: the picture, moved towards the text)."""
        given = ((name, getattr(self, name, None)) for name in ("text", "image", "item"))
        return [Term(**{name: value}) for name, value in given if value is not None]

    @model_validator(mode="after")
    def _something(self) -> SearchParams:
        if not self.all_terms():
            raise ValueError(f"give {self._wanted}")
        return self


class SearchRequest(SearchParams):
    """A query: any of `text`, `image` and `item`, and weighted `terms`, all added together; at least one."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [_TEXT, _IMAGE, _ITEM, _TERMS]})
    _wanted: ClassVar[str] = "a text, an image, an item or terms"
    image: str | None = Field(None, description="base64 of a picture file")
    terms: list[Term] = Field(default_factory=list, max_length=MAX_TERMS)

    def all_terms(self) -> list[Term]:
        return super().all_terms() + self.terms


class ImageRef(_Strict):
    """A picture: base64 bytes, or a stored item."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [_IMAGE, _ITEM]})

    image: str | None = None
    item: ItemId | None = Field(None, description="A stored picture's id (not a caption's).")

    @model_validator(mode="after")
    def _one_kind(self) -> ImageRef:
        if (self.image is None) == (self.item is None):
            raise ValueError("give exactly one of image (base64) or item")
        return self


class ClassifyRequest(_Strict):
    images: list[ImageRef] = Field(min_length=1, max_length=MAX_BATCH)
    labels: list[Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]] = Field(min_length=2, max_length=MAX_LABELS)
    template: Annotated[str, AfterValidator(_label_template)] = Field(
        "a photo of a {}.",
        max_length=MAX_TEXT,
        json_schema_extra={"pattern": LABEL_TEMPLATE},
        description="The text a label becomes: each {} is replaced by the label; no other braces.",
    )


class ModerateItem(_Strict):
    """One upload to judge: a picture (base64 or stored item), its accompanying text, or both."""

    model_config = ConfigDict(
        json_schema_extra={"anyOf": [_IMAGE, _ITEM, _TEXT], "not": {"allOf": [_IMAGE, _ITEM]}},
    )

    image: str | None = None
    item: ItemId | None = Field(None, description="A stored picture's id (not a caption's).")
    text: str | None = Field(None, max_length=MAX_TEXT)

    @model_validator(mode="after")
    def _something(self) -> ModerateItem:
        if self.image is not None and self.item is not None:
            raise ValueError("give image or item, not both")
        if self.image is None and self.item is None and self.text is None:
            raise ValueError("give an image, an item or a text")
        return self


Score = Annotated[float, Field(ge=-1, le=1)]
Prompt = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
Name = Annotated[str, Field(max_length=MAX_NAME)]


class PolicyWeights(_Strict):
    """How much each modality counts in a concept's score; one left out counts for nothing."""

    image: float = Field(0, ge=0)
    text: float = Field(0, ge=0)


class PolicyConcept(_Strict):
    prompts: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)]
    threshold: Score
    review: Score | None = None
    weights: PolicyWeights | None = None
    confirm: bool | Name | None = Field(
        None, description="Re-score the review band with a matcher: true (the index's) or a matcher's name."
    )


class PolicyBlocklist(_Strict):
    path: str = Field(min_length=1, max_length=MAX_PATH, description="An absolute folder or a glob of pictures.")
    threshold: Score = 0.95
    action: Literal["block", "review"] = "block"


class InlinePolicy(_Strict):
    """A moderation policy in the shape of a policy file (see the README), bounded in size.

    The rules between fields (review at most threshold, some weight above 0, at least one concept
    or blocklist) are the policy reader's, answered 400 with the reason.
    """

    weights: PolicyWeights | None = None
    concepts: dict[Name, PolicyConcept] | None = Field(None, max_length=MAX_CONCEPTS)
    blocklists: dict[Name, PolicyBlocklist] | None = Field(None, max_length=MAX_CONCEPTS)

    def as_data(self) -> dict[str, Any]:
        """The policy as it was sent, for search.moderation.Policy.from_dict; a null counts as left out."""
        return self.model_dump(exclude_unset=True, exclude_none=True)


class ModerateRequest(_Strict):
    items: list[ModerateItem] = Field(min_length=1, max_length=MAX_BATCH)
    policy: InlinePolicy | None = Field(None, description="A policy inline; default: the server's --policy")


class ErrorMessage(BaseModel):
    """Why a request was refused or failed."""

    detail: str


_MEANINGS = {
    400: "The request cannot be answered as asked: its JSON, its query string, a picture or an item of the wrong kind.",
    401: "The server has a token and the request does not carry it.",
    404: "No such item.",
    413: "The request body is larger than the server's --max-upload.",
    503: "The model or the index cannot be used, or every worker is busy and the queue is full (see Retry-After).",
    504: "The request took longer than the server's --timeout.",
}


_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer: the scheme to use.", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "Seconds to wait, when the queue was full.", "schema": {"type": "integer"}}},
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses, each answered as {"detail": "why"}, with the headers some carry."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        responses[status] = {"model": ErrorMessage, "description": _MEANINGS[status]}
        if status in _HEADERS:
            responses[status]["headers"] = _HEADERS[status]
    return responses
