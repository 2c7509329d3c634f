"""clip-retrieval's back-end API (`/knn-service`, `/indices-list`, `/metadata`), so its ClipClient
and its clip-front page work against clipseek.

The shapes follow clip-retrieval's `clip back`: the request body is JSON whatever its
Content-Type says (clip-front posts text/plain to avoid a CORS preflight); the answer is a bare
list of results, the first `num_images` with their metadata (`image_path`, `url` and a base64
JPEG `image` for pictures; `caption` for texts), each with `id` and `similarity`. The query is
the first of: a non-empty `text`, `image` (base64), `image_url`, `embedding_input`. Options that
need models clipseek does not have (safety, violence, aesthetic, M-CLIP) are accepted and
ignored; `deduplicate` is ignored too, since an index holds each picture once.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from indexer.errors import ItemNotFoundError, QueryError
from search.engine import MAX_K
from search.engine import Query as EngineQuery
from search.http.context import engine_of, link, run
from search.http.schemas import MAX_RERANK, MAX_TEXT, ItemId, given, image_bytes, whole
from search.http.strict_input import StrictRoute
from search.http.url_fetch import fetch_image

router = APIRouter(tags=["clip-retrieval"], route_class=StrictRoute)
PREVIEW = 256  # pixels: the base64 `image` clip-front shows in its grid


class KnnRequest(BaseModel):
    # Clients send options clipseek has no use for. The query is the first non-empty one of four.
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "anyOf": [
                *(given(name, "string", minLength=1) for name in ("text", "image", "image_url")),
                given("embedding_input", "array", minItems=1),
            ]
        },
    )

    text: str | None = Field(None, max_length=MAX_TEXT)
    image: str | None = None
    image_url: str | None = Field(None, max_length=4096)
    embedding_input: list[float] | None = Field(None, max_length=8192)
    modality: str = "image"
    num_images: whole(0) = 40
    num_result_ids: whole(1) | None = None
    rerank: whole(1, MAX_RERANK) | None = None  # clipseek's own: the first N re-scored by the index's matcher
    indice_name: str | None = None


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ids: list[ItemId] = Field(max_length=MAX_K)
    indice_name: str | None = None


async def _body(request: Request, model: type[BaseModel]) -> Any:
    """The body as JSON whatever its Content-Type; a 422 in the shape FastAPI gives its own routes."""
    try:
        return model.model_validate(await request.json())
    except json.JSONDecodeError as error:
        raise RequestValidationError([_json_invalid(error)]) from None
    except ValidationError as error:
        errors = error.errors(include_url=False)
        raise RequestValidationError([{**one, "loc": ("body", *one["loc"])} for one in errors]) from None


def _json_invalid(error: json.JSONDecodeError) -> dict[str, Any]:
    return {"type": "json_invalid", "loc": ["body", error.pos], "msg": "JSON decode error", "ctx": {"error": error.msg}}


def _check_index(request: Request, name: str | None) -> None:
    known = request.app.state.settings.index_name
    if name not in (None, "", known):
        raise HTTPException(400, f"no index {name!r} here (indices: {known})")


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"content": {"application/json": {"schema": model.model_json_schema()}}, "required": True}}


# The routes read their bodies themselves, so FastAPI does not know they answer 422.
_REFUSALS = {
    422: {
        "description": "The body is not JSON or does not fit the schema.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
    }
}


@router.get("/indices-list")
def indices_list(request: Request) -> list[str]:
    """The index this server serves, by name."""
    return [request.app.state.settings.index_name]


@router.post("/knn-service", openapi_extra=_schema(KnnRequest), responses=_REFUSALS)
async def knn_service(request: Request) -> list[dict[str, Any]]:
    """Nearest neighbours in clip-retrieval's request and response shapes."""
    body = await _body(request, KnnRequest)
    _check_index(request, body.indice_name)
    query = await _query(request, body)
    k = min(body.num_result_ids or body.num_images or 1, MAX_K)
    modality = "image" if body.modality == "image" else "text"
    hits = await run(request, engine_of(request).search, query, k, modality, rerank=body.rerank)
    shown = body.num_images
    return [
        {
            **(await _metadata(request, hit.id) if rank < shown else {}),
            "id": hit.id,
            "similarity": hit.score,
            **({"match": hit.match} if hit.match is not None else {}),
        }
        for rank, hit in enumerate(hits)
    ]


@router.post("/metadata", openapi_extra=_schema(MetadataRequest), responses=_REFUSALS)
async def metadata(request: Request) -> list[dict[str, Any]]:
    """The metadata of stored items by id (unknown ids are left out)."""
    body = await _body(request, MetadataRequest)
    _check_index(request, body.indice_name)
    found = []
    for item_id in body.ids:
        try:
            found.append({"id": item_id, "metadata": await _metadata(request, item_id)})
        except ItemNotFoundError:
            continue
    return found


async def _query(request: Request, body: KnnRequest) -> EngineQuery:
    if body.text:
        return EngineQuery.text(body.text)
    if body.image:
        return EngineQuery.image(image_bytes(body.image))
    if body.image_url:
        settings = request.app.state.settings
        if not settings.fetch_urls:
            raise HTTPException(400, "this server does not fetch image_url (start it with --fetch-urls)")
        return EngineQuery.image(await run(request, fetch_image, body.image_url, settings.max_body))
    if body.embedding_input:
        return EngineQuery.vector(body.embedding_input)
    raise HTTPException(400, "must fill one of text, image, image_url and embedding_input")


async def _metadata(request: Request, item_id: int) -> dict[str, Any]:
    """clip-retrieval's metadata columns for one item."""
    engine = engine_of(request)
    item = await run(request, engine.item, item_id)
    if item["modality"] == "text":
        return {"caption": item["caption"]}
    found = {"image_path": item["path"], "url": link(request, "image", item_id=str(item_id))}
    try:
        path = await run(request, engine.image_file, item_id)
        preview = await run(request, request.app.state.thumbnails.jpeg, path, PREVIEW)
    except QueryError:  # the picture left the disk since it was indexed: no preview, still a result
        return found
    return {"image": base64.b64encode(preview).decode("ascii"), **found}
