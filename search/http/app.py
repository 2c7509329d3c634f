"""The HTTP API over one SearchEngine: `clipseek serve`, or `create_app(engine)` under any ASGI server.

One warm engine serves every request (it follows the indexer's commits by itself). Requests are
read strictly (strict_input: 400 for JSON or query strings that are not Unicode, NaN, or nested
too deep) and validated by pydantic (422 with the reason); clipseek's own errors become 400 (bad
query), 404 (no such item) or 503 (model or index unavailable); work longer than the timeout is a
504; a request that finds every worker busy and the queue full is a 503 with Retry-After
(context.Workers); a body larger than the limit is a 413 (uploads.BodyGuard), and so is a picture
whose header declares more pixels than the engine's budget (`clipseek serve --max-pixels`),
refused before it is decoded. URLs in answers are relative or under --public-url, never taken
from the Host header. With a token, every route that returns data needs `Authorization: Bearer
TOKEN`, checked before the request's body is read; /health, the search page's own files and the
OpenAPI description hold no data and stay open.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, File, Form, HTTPException, Query, Request, Security, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles

from indexer.errors import (
    ClipseekError,
    ItemNotFoundError,
    ModelError,
    PixelBudgetError,
    PolicyError,
    QueryError,
    StoreError,
)
from indexer.models.matcher import available_matchers
from search.engine import MAX_K, SearchEngine
from search.engine import Query as EngineQuery
from search.http import knn_service
from search.http.context import ServerSettings, Workers, engine_of, run
from search.http.schemas import (
    MAX_INTEGER,
    MAX_RERANK,
    MAX_TEXT,
    ClassifyRequest,
    FilterFields,
    ModerateRequest,
    SearchParams,
    SearchRequest,
    errors,
    image_bytes,
)
from search.http.strict_input import StrictRoute
from search.http.thumbnails import SIZES, Thumbnails
from search.http.uploads import BodyGuard

WEB = Path(__file__).with_name("web")
# States the scheme in the OpenAPI description and reads nothing: StrictRoute checks the token
# before anything else of a request is read.
BEARER = HTTPBearer(auto_error=False, scheme_name="bearer", description="the token given to `clipseek serve --token`")


def create_app(engine: SearchEngine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    # No redirect to add or drop a trailing slash: Starlette builds its Location from the Host header.
    app = FastAPI(
        title="clipseek",
        version=_version(),
        summary="CLIP search over an index of pictures and captions",
        redirect_slashes=False,
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.thumbnails = Thumbnails()
    app.state.workers = Workers(settings.workers, settings.queue)
    _error_handlers(app)

    api = APIRouter(dependencies=[Security(BEARER)], route_class=StrictRoute, responses=errors(400, 401, 413, 503, 504))
    _search_routes(api)
    _item_routes(api)
    _judging_routes(api)
    api.include_router(knn_service.router)
    app.include_router(api)

    @app.get("/health", tags=["server"])
    def health() -> dict[str, Any]:
        """Open to all: the server answers and the index is readable."""
        return {"status": "ok", "generation": engine.store.catalog.generation()}

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(WEB / "index.html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    if settings.cors:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(BodyGuard, limit=settings.max_body)
    return app


def _version() -> str:
    from importlib.metadata import version

    return version("clipseek")


def _error_handlers(app: FastAPI) -> None:
    statuses = [
        (ItemNotFoundError, 404),
        (QueryError, 400),
        (PolicyError, 400),
        (PixelBudgetError, 413),
        (ModelError, 503),
        (StoreError, 503),
    ]

    @app.exception_handler(ClipseekError)
    async def clipseek_error(request: Request, error: ClipseekError) -> JSONResponse:
        status = next((code for kind, code in statuses if isinstance(error, kind)), 400)
        return JSONResponse({"detail": str(error)}, status_code=status)

    @app.exception_handler(405)
    async def method_not_allowed(request: Request, error: Exception) -> JSONResponse:
        # The router names only the methods of the first route on a path, and GET and POST /search
        # are two routes: Allow gives the methods the OpenAPI description gives the path.
        path = request.scope["path"]
        described = {
            method.upper()
            for template, operations in app.openapi()["paths"].items()
            if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), path)
            for method in operations
        }
        described |= {"HEAD"} if "GET" in described else set()  # as the router answers HEAD wherever GET
        allowed = ", ".join(sorted(described)) or error.headers["Allow"]
        return JSONResponse({"detail": "Method Not Allowed"}, status_code=405, headers={"Allow": allowed})


# -- search ------------------------------------------------------------------------------------


def _query(terms) -> EngineQuery:
    query = EngineQuery()
    for term in terms:
        if term.text is not None:
            query += term.weight * EngineQuery.text(term.text)
        elif term.image is not None:
            query += term.weight * EngineQuery.image(image_bytes(term.image))
        else:
            query += term.weight * EngineQuery.item(term.item)
    return query


async def _answer(request: Request, query: EngineQuery, fields) -> dict[str, Any]:
    k = min(fields.k, MAX_K)
    hits = await run(request, engine_of(request).search, query, k, fields.modality, **fields.filters())
    return {
        "query": repr(query),
        "modality": fields.modality,
        "k": k,
        "offset": fields.offset,
        **({"rerank": fields.rerank} if fields.rerank is not None else {}),
        "hits": [hit.to_dict() for hit in hits],
    }


def _search_routes(api: APIRouter) -> None:
    @api.post("/search", tags=["search"], responses=errors(404))
    async def search(request: Request, body: SearchRequest) -> dict[str, Any]:
        """Nearest items to a text, a picture (base64), a stored item, or a weighted mix of them (`terms`)."""
        return await _answer(request, _query(body.all_terms()), body)

    @api.get("/search", tags=["search"], responses=errors(404))
    async def search_get(request: Request, params: Annotated[SearchParams, Query()]) -> dict[str, Any]:
        """POST /search for a text or an item, in the URL: `/search?text=a+red+circle&k=5`."""
        return await _answer(request, _query(params.all_terms()), params)

    @api.post("/search/image", tags=["search"])
    async def search_upload(
        request: Request,
        image: Annotated[UploadFile, File(description="the query picture")],
        text: Annotated[str | None, Form(max_length=MAX_TEXT, description="a text added to the picture")] = None,
        modality: Annotated[str, Form(pattern="^(image|text)$")] = "image",
        k: Annotated[int, Form(ge=1, le=MAX_INTEGER)] = 10,
        offset: Annotated[int, Form(ge=0, le=100_000)] = 0,
        rerank: Annotated[int | None, Form(ge=1, le=MAX_RERANK, description="captions re-scored by a matcher")] = None,
    ) -> dict[str, Any]:
        """A multipart upload: `curl -F image=@cat.jpg -F k=5 http://127.0.0.1:8000/search/image`."""
        query = EngineQuery.image(await image.read())
        if text:
            query += EngineQuery.text(text)
        return await _answer(request, query, FilterFields(modality=modality, k=k, offset=offset, rerank=rerank))


# -- items -------------------------------------------------------------------------------------


def _item_id(item_id: str) -> int:
    # Only a plain number in ASCII digits names an item; anything else (a path, '..', '١٢') names nothing.
    if not (item_id.isascii() and item_id.isdecimal()) or len(item_id) > 18:
        raise HTTPException(404, f"no item {item_id[:40]!r}")
    return int(item_id)


def _item_routes(api: APIRouter) -> None:
    @api.get("/items/{item_id}", tags=["items"], responses=errors(404))
    async def item(request: Request, item_id: str) -> dict[str, Any]:
        """What the index knows of an item."""
        return await run(request, engine_of(request).item, _item_id(item_id))

    @api.get("/items/{item_id}/thumbnail", tags=["items"], response_class=Response, responses=errors(404))
    async def thumbnail(request: Request, item_id: str, size: Annotated[int, Query(ge=SIZES[0], le=SIZES[1])] = 256):
        """A JPEG preview of a stored picture, at most `size` pixels on its long side."""
        path = await run(request, engine_of(request).image_file, _item_id(item_id))
        data = await run(request, request.app.state.thumbnails.jpeg, path, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=600"})

    @api.get("/items/{item_id}/image", tags=["items"], response_class=FileResponse, responses=errors(404))
    async def image(request: Request, item_id: str):
        """The stored picture itself, as it is on disk (the path comes from the catalog only)."""
        path = await run(request, engine_of(request).image_file, _item_id(item_id))
        if not path.is_file():
            raise HTTPException(404, f"item {item_id} is no longer on disk")
        return FileResponse(path, headers={"X-Content-Type-Options": "nosniff"})

    @api.get("/stats", tags=["server"])
    async def stats(request: Request) -> dict[str, Any]:
        """Items per modality and collection, the model, the index type, the matchers that can
        re-rank its answers (the default first), sizes on disk."""
        state = await run(request, engine_of(request).store.status)
        return {
            "index": request.app.state.settings.index_name,
            "model": state.model.to_dict() if state.model else None,
            "index_type": state.index_type,
            "matchers": available_matchers(state.model.architecture) if state.model else [],
            "generation": state.generation,
            "updated_at": state.updated_at,
            "items": [{"modality": m, "collection": c, "count": n} for m, c, n in state.counts],
            "failures": state.failures,
            "bytes_on_disk": state.bytes_on_disk,
        }


# -- classify and moderate ---------------------------------------------------------------------


def _picture(ref) -> Any:
    """A picture given as a stored item id or base64 bytes; None when it has neither."""
    if ref.item is not None:
        return ref.item
    return None if ref.image is None else image_bytes(ref.image)


def _judging_routes(api: APIRouter) -> None:
    @api.post("/classify", tags=["judge"], responses=errors(404))
    async def classify(request: Request, body: ClassifyRequest) -> dict[str, Any]:
        """Zero-shot classification: each picture's probability for each label, best first."""
        pictures = [_picture(ref) for ref in body.images]
        results = await run(request, engine_of(request).classify, pictures, body.labels, body.template)
        return {"results": [{"labels": labels} for labels in results]}

    @api.post("/moderate", tags=["judge"], responses=errors(404))
    async def moderate(request: Request, body: ModerateRequest) -> dict[str, Any]:
        """Judge pictures and texts against the server's policy (or one sent inline): block, review or allow."""
        from search.moderation import Policy

        policy = request.app.state.settings.policy
        if body.policy is not None:
            policy = Policy.from_dict(body.policy.as_data())
        if policy is None:
            raise HTTPException(400, "no policy: start the server with --policy FILE or send one in the request")
        items = [(_picture(item), item.text) for item in body.items]
        verdicts = await run(request, engine_of(request).moderate_many, items, policy)
        return {"results": [verdict.to_dict() for verdict in verdicts]}
