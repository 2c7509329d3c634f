"""SearchEngine: nearest-neighbour queries over an index, for people and for pipelines.

    engine = SearchEngine.open("photos")
    engine.search("a cat sunbathing", k=10)                         # text → image
    engine.search(Query.image("cat.jpg") + Query.text("at night"))  # image + text → image
    engine.search(Query.text("beach") + "dog" - Query.text("people"))
    engine.search(Path("cat.jpg"), modality="text")                 # image → caption
    engine.search("a red circle left of a blue square", rerank=30)  # the top 30 re-ranked by a matcher
    engine.moderate(image="upload.jpg", policy=Policy.load("policy.yaml"))  # search.moderation

One engine serves many threads. It opens the index read-only, loads the index's own model on
the first query that needs one, and follows the indexer: every query checks the catalog's
generation and picks up new commits without reopening.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.config import index_location
from indexer.errors import BadFileError, ItemNotFoundError, PixelBudgetError, QueryError
from indexer.models.devices import CPU, Placement, place
from indexer.models.scores import MATCH, ScoreScale
from indexer.store import MODALITIES, Filters, Store
from search.query import Hit, Query
from search.recent import Recent

if TYPE_CHECKING:
    from PIL import Image

    from indexer.models.encoder import Encoder
    from indexer.models.matcher import Matcher
    from indexer.models.onnx_encoder import OnnxEncoder
    from search.moderation import Policy, Verdict

__all__ = ["MAX_K", "Hit", "Query", "SearchEngine"]

MAX_K = 1000  # more hits than anyone reads; larger requests are capped
PROMPT_CACHE = 64  # policies whose prompt embeddings an engine keeps (inline HTTP policies vary)
# A label template: the label goes where {} is, and no other brace may appear. The template is
# never a format string, so it cannot reach attributes ({0.__class__}) or pad a label ({:>99999999}).
LABEL_TEMPLATE = r"^[^{}]*(?:\{\}[^{}]*)+$"


class SearchEngine:
    """Queries over one index, opened read-only; safe to share between threads.

    `max_pixels`: a picture given as a file or bytes whose header declares more pixels is
    refused with PixelBudgetError before it is decoded (indexer.config.PIXEL_BUDGET suits
    pictures from others); without it, Pillow's own limit for decompression bombs applies.
    """

    def __init__(
        self,
        store: Store,
        checkpoint: str | os.PathLike | None = None,
        offline: bool | None = None,
        *,
        max_pixels: int | None = None,
        placement: Placement = CPU,
        fetch_matchers: bool = True,
    ):
        self.store = store
        self.max_pixels = max_pixels
        self.fetch_matchers = fetch_matchers
        self._placement = placement
        self._checkpoint = checkpoint
        self._offline = offline
        self._encoder: Encoder | OnnxEncoder | None = None
        self._lock = threading.Lock()
        self._prompts = Recent(PROMPT_CACHE)  # its own lock, not self._lock: embedding takes that one

    @classmethod
    def open(
        cls,
        index: str | os.PathLike | None = None,
        checkpoint: str | os.PathLike | None = None,
        offline: bool | None = None,
        *,
        max_pixels: int | None = None,
        device: str = "auto",
        fetch_matchers: bool = True,
    ) -> SearchEngine:
        """Open an index by name or folder. `checkpoint`: where its model's weights are now, if moved
        (they must be the same weights). The model's weights, when missing from the cache, download
        on first use unless `offline` (None: CLIPSEEK_OFFLINE or HF_HUB_OFFLINE say). `max_pixels`:
        the pixel budget of pictures given to it. `device`: where queries embed ("auto": a GPU only
        through ONNX Runtime's CUDA provider; see indexer.models.devices). `fetch_matchers`: whether
        a query that asks for a matcher missing from the cache downloads it (a server says no, so
        that no request starts a download: QueryError instead)."""
        placement = place(device, queries=True)  # a device that is not there fails before the index opens
        store = Store.open(index_location(index))
        try:
            store.check_checkpoint(checkpoint)
        except BaseException:
            store.close()
            raise
        return cls(
            store, checkpoint, offline, max_pixels=max_pixels, placement=placement, fetch_matchers=fetch_matchers
        )

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> SearchEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def warm(self) -> None:
        """Load what queries need before they come (a server's start): the model now, and in a
        thread of its own the memory-mapped embeddings that approximate indexes re-rank from
        (Reranking.warm), so that the first queries neither wait for nor fault their rows in."""
        self.encoder  # noqa: B018
        threading.Thread(target=_warm_quietly, args=(self.store,), name="clipseek-warm", daemon=True).start()

    @property
    def encoder(self) -> Encoder | OnnxEncoder:
        """The index's own model, loaded on first use."""
        with self._lock:
            if self._encoder is None:
                from indexer.models.backend import encoder_for

                self._encoder = encoder_for(self.store, self._checkpoint, self._offline, self._placement)
            return self._encoder

    @property
    def score_scale(self) -> ScoreScale:
        """What the index's model's scores mean (indexer.models.scores): its temperature and, for
        a model trained with the sigmoid loss, the bias that puts its cosines on a scale of their own."""
        return ScoreScale(self.encoder.logit_scale, self.encoder.logit_bias)

    # -- queries ---------------------------------------------------------------------------

    def embed(self, query: Any) -> np.ndarray:
        """The unit vector a query stands for."""
        query = Query.of(query)
        if not query.terms:
            raise QueryError("empty query: give a text, an image or an item id")
        total = np.zeros(self.store.model_id.dim, np.float64)
        for weight, kind, value in query.terms:
            total += weight * self._term_vector(kind, value)
        norm = np.linalg.norm(total)
        if norm < 1e-6:
            raise QueryError(f"the terms of {query!r} cancel out")
        return (total / norm).astype(np.float32)

    def _term_vector(self, kind: str, value: Any) -> np.ndarray:
        if kind == "vector":
            if value.shape != (self.store.model_id.dim,):
                raise QueryError(f"a query vector must have {self.store.model_id.dim} values, not {value.shape}")
            return value
        if kind == "item":
            vector = self.store.catalog.embedding(value)
            if vector is None:
                raise ItemNotFoundError(f"no item {value} in the index")
            return vector
        if kind == "text":
            if not str(value).strip():
                raise QueryError("empty query text")
            return self.encoder.embed_texts([str(value)])[0]
        return self.encoder.embed_images([self._query_image(value)])[0]

    def read_picture(self, value: Any, side: int | None = None) -> Image.Image:
        """A picture given as a path, bytes, a PIL image or a stored picture's id, decoded to at
        least `side` (default: the model's)."""
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            value = self.image_file(int(value))
        return self._query_image(value, side)

    def _query_image(self, value: Any, side: int | None = None) -> Image.Image:
        from PIL import Image

        from indexer.sources.pictures import decode_image, to_rgb  # Pillow's decoders: for a picture query only

        if isinstance(value, Image.Image):
            return to_rgb(value)
        source = io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else os.fsencode(value)
        name = "the query image" if isinstance(source, io.BytesIO) else os.fsdecode(source)
        try:
            return decode_image(source, side or self.store.model_id.side, self.max_pixels).image
        except PixelBudgetError as error:
            raise PixelBudgetError(f"{name}: {error}") from error
        except BadFileError as error:
            raise QueryError(f"cannot read {name}: {error}") from error

    def search(
        self,
        query: Any,
        k: int = 10,
        modality: str = "image",
        *,
        path: str | None = None,
        collection: str | None = None,
        date_from: str | None = None,
        date_to: str | None = None,
        min_score: float | str | None = None,
        offset: int = 0,
        rerank: int | None = None,
        matcher: str | None = None,
    ) -> list[Hit]:
        """The k items of `modality` nearest to `query`, best first, after `offset`.

        Filters: `path`, a folder prefix or a glob (`*`, `?`, `[…]`) on the picture's path;
        `collection`; `date_from` / `date_to` (ISO dates, inclusive) on the date taken (EXIF,
        else the file's time); `min_score`, a cosine, or MATCH ("match"): from the cosine at which
        the model itself gives a text and a picture even odds (sigmoid-trained models, a text
        against pictures or a picture against captions). With filters the result is still the top k among the
        matching items: exact with a flat index (the default while exact search is fast) or a filter
        matching up to 20,000, else as approximate as the index (its recall is in `status`),
        but never fewer than k when k match. k is capped at MAX_K.

        `rerank`: re-score the first `rerank` candidates with a matcher that reads the query with
        each of them (search.matching), and order them by its logit of a match with the dual
        encoder's evidence added (Hit.match: the matcher's own probability);
        `matcher` names it (default: the one that suits the index's model, see `matchers`). The
        query is then one text (pictures re-ranked) or one picture (captions re-ranked).
        """
        if modality not in MODALITIES:
            raise QueryError(f"modality must be one of {', '.join(MODALITIES)}, not {modality!r}")
        if k <= 0:
            raise QueryError(f"k must be at least 1, not {k}")
        if offset < 0:
            raise QueryError(f"offset must be 0 or more, not {offset}")
        k = min(k, MAX_K)
        reranking = None
        if rerank is not None:
            if rerank <= 0:
                raise QueryError(f"rerank must be at least 1, not {rerank}")
            reranking = (self.matcher(matcher), min(rerank, MAX_K), query)
        filters = Filters(path, collection, date_from, date_to)
        min_score = self._minimum(Query.of(query), modality, min_score)
        if collection is not None and collection not in self.store.catalog.collections():
            known = ", ".join(self.store.catalog.collections()) or "none"
            raise QueryError(f"no collection '{collection}' in the index (collections: {known})")
        self.store.refresh()
        if self.store.holds(modality):  # warm: a thread's start and join would only add to the query
            return self._nearest(self.embed(query), modality, k, offset, filters, min_score, reranking)
        # The vectors load (on a cold start) while the query is embedded: both wait on C++ code
        # that releases the GIL (FAISS reading its file; ONNX Runtime or torch loading a model).
        loading = threading.Thread(target=_load_quietly, args=(self.store, modality))
        loading.start()
        try:
            vector = self.embed(query)
        finally:
            loading.join()
        return self._nearest(vector, modality, k, offset, filters, min_score, reranking)

    def _minimum(self, query: Query, modality: str, min_score: float | str | None) -> float | None:
        if min_score != MATCH:
            return min_score
        kinds = {kind for _, kind, _ in query.terms}
        if not ((kinds == {"text"} and modality == "image") or (kinds == {"image"} and modality == "text")):
            raise QueryError(
                "a minimum score of 'match' is for a text against pictures or a picture against captions, "
                "the pairs the model was trained to judge: give a number"
            )
        cosine = self.score_scale.match_cosine
        if cosine is None:
            raise QueryError(
                f"{self.store.model_id.architecture} was trained with CLIP's softmax loss: its scores rank "
                "results, and no score of its own says that a text and a picture match; give a number "
                "(matching pairs commonly score 0.25 to 0.35 with CLIP models)"
            )
        return cosine

    def _nearest(
        self,
        vector: np.ndarray,
        modality: str,
        k: int,
        offset: int,
        filters: Filters,
        min_score: float | None,
        reranking: tuple[Matcher, int, Any] | None = None,
    ) -> list[Hit]:
        allowed = self.store.catalog.matching_ids(modality, filters) if filters.any() else None
        wanted = k + offset if reranking is None else max(k + offset, reranking[1])
        ids, scores = self.store.nearest(modality, vector, wanted, allowed)
        found = [(int(i), float(s)) for i, s in zip(ids, scores, strict=True)]
        if min_score is not None:
            found = [(i, s) for i, s in found if s >= min_score]
        if reranking is None:
            found = found[offset : offset + k]
            rows = self.store.catalog.items_by_id([i for i, _ in found])
            return [_hit(rows[i], s) for i, s in found if i in rows]
        from search.matching import query_side, reading_side, rerank

        matcher, count, query = reranking
        rows = self.store.catalog.items_by_id([i for i, _ in found])
        read = query_side(query, modality, self.store, self._query_image, reading_side(matcher))
        ordered = rerank(matcher, read, rows, found, count, self.encoder.logit_scale)[offset : offset + k]
        return [dataclasses.replace(_hit(rows[i], s), match=p) for i, s, p in ordered if i in rows]

    def matcher(self, name: str | None = None) -> Matcher:
        """The matcher called `name` (BLIP's weights downloaded now where they are missing, unless
        offline), or the one on this machine that suits the index's model; QueryError when there
        is none (indexer.models.matcher.available_matchers)."""
        from indexer.models.matcher import available_matchers, load_matcher, none_available

        architecture = self.store.model_id.architecture
        if name is None:
            suited = available_matchers(architecture)
            if not suited:
                raise QueryError(f"{none_available(architecture)}; or search without --rerank")
            name = suited[0]
        return load_matcher(name, architecture, offline=self._offline, fetch=self.fetch_matchers)

    def similar(self, item_or_image: Any, threshold: float = 0.9, k: int = 100) -> list[Hit]:
        """Pictures at least `threshold` similar to a stored item or an image: near-duplicates."""
        hits = self.search(item_or_image, k=k + 1, min_score=threshold)
        if isinstance(item_or_image, (int, np.integer)):
            hits = [hit for hit in hits if hit.id != int(item_or_image)]
        return hits[:k]

    def item(self, item_id: int) -> dict[str, Any]:
        """What the index knows of one stored item (a hit without a score)."""
        row = self._row(item_id)
        return {key: value for key, value in asdict(_hit(row, 0.0)).items() if key != "score"}

    def image_file(self, item_id: int) -> Path:
        """Where a stored picture is on disk: taken from the catalog, never from the caller."""
        return Path(os.fsdecode(self._picture(item_id).path))

    def _picture(self, item_id: int):
        row = self._row(item_id)
        if row.modality != "image":
            raise QueryError(f"item {item_id} is a caption, not a picture")
        return row

    def _row(self, item_id: int):
        row = self.store.catalog.items_by_id([item_id]).get(item_id)
        if row is None:
            raise ItemNotFoundError(f"no item {item_id} in the index")
        return row

    def classify(
        self, images: Sequence[Any], labels: Sequence[str], template: str = "a photo of a {}."
    ) -> list[dict[str, float]]:
        """CLIP zero-shot classification: for each image, each label's probability, best first.

        An image is a path (str or Path), bytes, a PIL image or a stored picture's id (int).
        Probabilities are the softmax of the model's own logit scale times the cosine
        similarities to `template` with each {} replaced by the label (LABEL_TEMPLATE).
        """
        labels = [label.strip() for label in labels if label.strip()]
        if len(labels) < 2:
            raise QueryError("give at least two labels to choose between")
        if not re.match(LABEL_TEMPLATE, template):
            raise QueryError(f"a label template has {{}} for the label and no other braces, not {template[:100]!r}")
        texts = self.encoder.embed_texts([template.replace("{}", label) for label in labels])
        logits = self.encoder.logit_scale * self.embed_images(images) @ texts.T
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        return [
            dict(sorted(zip(labels, map(float, row), strict=True), key=lambda pair: -pair[1])) for row in probabilities
        ]

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """Unit vectors of images (paths, bytes, PIL images or stored pictures' ids), new ones embedded in one batch."""
        vectors = np.zeros((len(images), self.store.model_id.dim), np.float32)
        stored = {
            row: int(image)
            for row, image in enumerate(images)
            if isinstance(image, (int, np.integer)) and not isinstance(image, bool)
        }
        for row, item in stored.items():
            self._picture(item)  # a caption's vector is no picture to classify or moderate
            vectors[row] = self._term_vector("item", item)
        fresh = [row for row in range(len(images)) if row not in stored]
        if fresh:
            vectors[fresh] = self.encoder.embed_images([self._query_image(images[row]) for row in fresh])
        return vectors

    def embed_prompts(self, prompts: tuple[str, ...]) -> np.ndarray:
        """Text embeddings of a set of prompts, kept for the next call: a policy is reused for every upload."""
        vectors = self._prompts.get(prompts)
        if vectors is None:
            vectors = self.encoder.embed_texts(list(prompts))  # outside any lock: other policies need not wait
            vectors.flags.writeable = False  # shared by every caller from now on
            self._prompts.put(prompts, vectors)
        return vectors

    def moderate(self, image: Any = None, text: str | None = None, *, policy: Policy) -> Verdict:
        """Judge a picture, a text or both against a moderation policy (search.moderation.Policy).

        The picture is a path, bytes, a PIL image or a stored item id. The verdict's decision is
        "block", "review" or "allow", with the reasons and every concept's scores.
        """
        return self.moderate_many([(image, text)], policy)[0]

    def moderate_many(self, items: Sequence[tuple[Any, str | None]], policy: Policy) -> list[Verdict]:
        """`moderate` for many (image or None, text or None) pairs: pictures and texts embedded in batches."""
        from search.moderation import moderate

        return moderate(self, items, policy)


def _warm_quietly(store) -> None:
    with contextlib.suppress(Exception):  # a file that cannot be warmed is said by the query that reads it
        store.reranking.warm()


def _load_quietly(store, modality: str) -> None:
    with contextlib.suppress(Exception):  # raised again, with its message, where _nearest asks for them
        store.vectors(modality)


def _hit(row, score: float) -> Hit:
    if row.modality == "image":
        metadata = {"width": row.width, "height": row.height, "taken_at": row.taken_at, "size": row.size}
        return Hit(row.id, score, "image", path=row.display, metadata=metadata)
    metadata = {key: value for key, value in (("ref", row.ref), ("image", row.image_ref)) if value is not None}
    return Hit(row.id, score, "text", caption=row.caption, collection=row.collection, metadata=metadata)
