"""The HTTP API over a real socket: `clipseek serve` on a demo index, called as a client calls it."""

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from indexer.demo_world import Scene, render
from indexer.pipeline import Indexer
from search.cli.main import cli
from search.engine import MAX_K, SearchEngine
from tests.http_server import demo_index, peak_memory, serving
from tests.odd_pictures import huge_png

TOKEN = "correct horse battery staple"


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    return root, demo_index(root)


@pytest.fixture(scope="module")
def server(library):
    root, _ = library
    cache = {"HF_HUB_CACHE": str(root / "hf")}  # a hub cache of its own, without BLIP
    with serving(root / "index", "--token", TOKEN, "--max-upload", "1M", "--fetch-urls", env=cache) as url:
        yield url


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
        yield client


def png_of(scene: Scene, side: int = 96) -> bytes:
    out = io.BytesIO()
    render(scene, side, np.random.default_rng(0)).save(out, "PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_the_token_guards_every_data_route_and_not_health(server):
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    for method, path in [
        ("GET", "/search?text=red"),
        ("POST", "/search"),
        ("GET", "/items/1"),
        ("GET", "/stats"),
        ("POST", "/knn-service"),
        ("GET", "/indices-list"),
        ("POST", "/moderate"),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = httpx.request(method, server + path, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.headers["www-authenticate"] == "Bearer"


def test_text_search_returns_the_python_apis_hits(client, library):
    root, scenes = library
    answer = client.get("/search", params={"text": "a large red circle", "k": 5}).json()
    with SearchEngine.open(root / "index") as engine:
        expected = engine.search("a large red circle", k=5)
    assert [hit["id"] for hit in answer["hits"]] == [hit.id for hit in expected]
    assert [hit["score"] for hit in answer["hits"]] == pytest.approx([hit.score for hit in expected], abs=1e-6)
    top = scenes[answer["hits"][0]["path"]]
    assert (top.colour, top.shape) == ("red", "circle")


def test_combined_query_filters_and_paging(client, library):
    root, _ = library
    body = {"terms": [{"text": "a circle"}, {"text": "red", "weight": 2}, {"text": "grass", "weight": -0.5}], "k": 6}
    whole = client.post("/search", json=body).json()
    assert whole["query"] == "1·text('a circle') + 2·text('red') + -0.5·text('grass')"
    second = client.post("/search", json={**body, "k": 3, "offset": 3}).json()
    assert second["hits"] == whole["hits"][3:]
    album = str(root / "library" / "album-02")
    filtered = client.post("/search", json={**body, "path": album}).json()["hits"]
    assert filtered and all(hit["path"].startswith(album + "/") for hit in filtered)
    captions = client.get("/search", params={"text": "a blue star", "modality": "text", "k": 3}).json()["hits"]
    assert [hit["collection"] for hit in captions] == ["demo"] * 3 and all(hit["caption"] for hit in captions)


def test_search_by_uploaded_picture_base64_and_item(client, library):
    _, scenes = library
    path = next(p for p in scenes if p.endswith(".jpg"))
    data = Path(path).read_bytes()
    uploaded = client.post("/search/image", files={"image": ("q.jpg", data)}, data={"k": "2"}).json()
    assert uploaded["hits"][0]["path"] == path and uploaded["hits"][0]["score"] == pytest.approx(1, abs=1e-4)
    posted = client.post("/search", json={"image": b64(data), "k": 2}).json()
    assert posted["hits"] == uploaded["hits"]
    by_item = client.post("/search", json={"item": uploaded["hits"][0]["id"], "k": 1}).json()
    assert by_item["hits"][0]["path"] == path


@pytest.mark.parametrize(
    ("k", "status", "used"), [(10**9, 200, MAX_K), (-1, 422, None), (0, 422, None), ("ten", 422, None)]
)
def test_k_is_capped_or_refused(client, k, status, used):
    response = client.get("/search", params={"text": "a red circle", "k": k})
    assert response.status_code == status
    if used is not None:
        assert response.json()["k"] == used
    else:
        assert response.json()["detail"][0]["loc"] == ["query", "k"]


def test_malformed_requests_are_422_with_the_reason(client):
    response = client.post("/search", json={"terms": [{"text": "a", "item": 3}]})
    assert response.status_code == 422 and "exactly one of text, image or item" in response.text
    assert client.post("/search", json={"k": 3}).status_code == 422
    assert client.post("/search", content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 422


def decompression_bomb() -> bytes:
    """A PNG whose header claims 100,000 × 100,000 pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("upload", "reason"),
    [
        (b"not a picture at all", "not a picture"),
        (png_of(Scene("circle", "red", "large", "centre", "grass"))[:300], "corrupt or truncated"),
        (b"%PDF-1.4\n" + b"0" * 100, "not a picture"),
    ],
)
def test_bad_uploads_are_400_and_the_server_lives_on(client, upload, reason):
    response = client.post("/search/image", files={"image": ("x.png", upload)})
    assert response.status_code == 400 and reason in response.json()["detail"]
    assert client.post("/search", json={"image": "@@not base64@@"}).status_code == 400
    assert client.get("/health").status_code == 200


def test_a_picture_declaring_more_pixels_than_the_budget_is_413_before_decoding(client, server):
    huge = b64(huge_png(12_000, 12_000))  # 20 KB of PNG; decoded, 144 MB of pixels at least
    policy = {"concepts": {"red circles": {"prompts": ["a red circle"], "threshold": 0.6}}}
    before = peak_memory(server.pid)
    for response in [
        client.post("/search/image", files={"image": ("huge.png", huge_png(12_000, 12_000))}),
        client.post("/search", json={"image": huge, "k": 3}),
        client.post("/classify", json={"images": [{"image": huge}], "labels": ["red", "blue"]}),
        client.post("/moderate", json={"items": [{"image": huge}], "policy": policy}),
        knn(client, image=huge, modality="image", num_images=1, indice_name=None),
    ]:
        assert response.status_code == 413, response.text
        assert response.json()["detail"] == (
            "the query image: 12000 × 12000 pixels (144 MP) is over the pixel budget of 50 MP"
        )
    assert peak_memory(server.pid) - before < 20 * 2**20  # nothing was decoded
    bomb = client.post("/search/image", files={"image": ("bomb.png", decompression_bomb())})  # past Pillow's limit
    assert bomb.status_code == 413 and "more than 179 MP is over the pixel budget" in bomb.json()["detail"]
    assert client.get("/health").status_code == 200


def test_oversized_bodies_are_413_declared_or_streamed(client):
    big = b"\0" * (2 * 2**20)
    assert client.post("/search/image", files={"image": ("big.jpg", big)}).status_code == 413

    def chunks():  # no Content-Length: the server counts as it reads
        yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n\r\n'
        for _ in range(32):
            yield b"\0" * 2**16

    streamed = client.post(
        "/search/image", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert streamed.status_code == 413
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/items/../../etc/passwd",
        "/items/..%2F..%2Fetc%2Fpasswd",
        "/items/%2e%2e%2f%2e%2e%2fetc%2fpasswd/image",
        "/items/..%2Fcatalog.sqlite/thumbnail",
        "/items/1%2F..%2F..%2Fetc%2Fpasswd/image",
        "/items/-1",
        "/items/1e3/image",
        "/items/99999999/thumbnail",
        "/items/%2Fetc%2Fpasswd/image",
    ],
)
def test_item_routes_name_items_by_id_only(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert b"root:" not in response.content


def test_item_metadata_thumbnail_and_image(client):
    hit = client.get("/search", params={"text": "a small blue square", "k": 1}).json()["hits"][0]
    item = client.get(f"/items/{hit['id']}").json()
    assert item["path"] == hit["path"] and "score" not in item
    thumbnail = client.get(f"/items/{hit['id']}/thumbnail", params={"size": 128})
    assert thumbnail.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumbnail.content)).size) <= 128
    original = client.get(f"/items/{hit['id']}/image")
    assert original.content == Path(hit["path"]).read_bytes()
    caption = client.get("/search", params={"text": "a red star", "modality": "text", "k": 1}).json()["hits"][0]
    assert client.get(f"/items/{caption['id']}/image").status_code == 400


def test_stats_and_new_commits_without_restart(client, library):
    root, _ = library
    before = client.get("/stats").json()
    assert (
        before["model"]["architecture"] == "demo"
        and {"modality": "image", "collection": None, "count": 60} in before["items"]
        and before["matchers"] == ["demo"]
    )
    extra = root / "later"
    extra.mkdir()
    Image.open(io.BytesIO(png_of(Scene("cross", "yellow", "large", "centre", "night")))).save(extra / "new.png")
    with Indexer.open(root / "index") as indexer:
        indexer.index([extra])
    after = client.get("/stats").json()
    assert after["generation"] > before["generation"]
    assert {"modality": "image", "collection": None, "count": 61} in after["items"]
    hits = client.get("/search", params={"text": "a large yellow cross", "k": 61, "path": str(extra)}).json()["hits"]
    assert [hit["path"] for hit in hits] == [str(extra / "new.png")]


def test_classify_and_moderate(client, tmp_path):
    red = b64(png_of(Scene("circle", "red", "large", "centre", "sand")))
    blue = b64(png_of(Scene("square", "blue", "large", "centre", "sand")))
    answer = client.post(
        "/classify",
        json={"images": [{"image": red}, {"image": blue}], "labels": ["red", "blue"], "template": "a {} shape"},
    ).json()
    assert [next(iter(result["labels"])) for result in answer["results"]] == ["red", "blue"]
    assert sum(answer["results"][0]["labels"].values()) == pytest.approx(1)

    assert client.post("/moderate", json={"items": [{"text": "hello"}]}).status_code == 400  # no policy anywhere
    policy = {"concepts": {"red circles": {"prompts": ["a red circle"], "threshold": 0.6}}}
    verdicts = client.post(
        "/moderate", json={"items": [{"image": red}, {"text": "a red circle"}, {"image": blue}], "policy": policy}
    ).json()["results"]
    assert [verdict["decision"] for verdict in verdicts] == ["block", "block", "allow"]
    assert verdicts[0]["reasons"][0].startswith("red circles: ")
    bad = client.post("/moderate", json={"items": [{"text": "x"}], "policy": {"concepts": {"c": {"threshold": 1}}}})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "policy", "concepts", "c", "prompts"]
    # everything in the review band, where the demo matcher decides: the red picture blocked, the
    # blue one allowed, the text (which it cannot read against a picture) still for review
    confirming = {
        "concepts": {"red circles": {"prompts": "a red circle", "threshold": 1, "review": -1, "confirm": True}}
    }
    verdicts = client.post(
        "/moderate",
        json={"items": [{"image": red}, {"text": "red circles for sale"}, {"image": blue}], "policy": confirming},
    ).json()["results"]
    assert [verdict["decision"] for verdict in verdicts] == ["block", "review", "allow"]
    assert [verdict["concepts"][0]["matcher"] for verdict in verdicts] == ["demo", None, "demo"]
    assert "rejected by the demo matcher" in verdicts[2]["reasons"][0]
    confirming["concepts"]["red circles"]["confirm"] = "blip"  # not in the server's cache: no request downloads it
    refused = client.post("/moderate", json={"items": [{"image": red}], "policy": confirming})
    assert refused.status_code == 400 and "clipseek models fetch blip" in refused.json()["detail"]
    policy["concepts"]["red circles"]["review"] = 0.9  # above the threshold: a rule between fields
    bad = client.post("/moderate", json={"items": [{"text": "x"}], "policy": policy})
    assert bad.status_code == 400 and "must be at most threshold" in bad.json()["detail"]


# -- clip-retrieval compatibility ----------------------------------------------------------------


def knn(client, **body):
    # clip-front posts JSON as text/plain; the server must read it all the same.
    return client.post("/knn-service", content=json.dumps(body), headers={"Content-Type": "text/plain"})


def test_knn_service_in_clip_retrievals_shapes(client, library):
    root, scenes = library
    assert client.get("/indices-list").json() == ["index"]
    results = knn(
        client,
        text="a large red circle",
        modality="image",
        num_images=3,
        num_result_ids=8,
        indice_name="index",
        deduplicate=True,
        use_safety_model=True,
        aesthetic_score="",
        image=None,
        image_url=None,
        embedding_input=None,
    ).json()
    assert len(results) == 8
    assert all({"image", "image_path", "url", "id", "similarity"} <= set(result) for result in results[:3])
    assert all(set(result) == {"id", "similarity"} for result in results[3:])
    assert (scenes[results[0]["image_path"]].colour, scenes[results[0]["image_path"]].shape) == ("red", "circle")
    Image.open(io.BytesIO(base64.b64decode(results[0]["image"]))).verify()
    assert client.get(results[0]["url"]).content == Path(results[0]["image_path"]).read_bytes()

    with SearchEngine.open(root / "index") as engine:
        vector = engine.embed("a large red circle").tolist()
    by_vector = knn(client, text="", embedding_input=vector, modality="image", num_images=8, indice_name=None).json()
    assert [r["id"] for r in by_vector] == [r["id"] for r in results]

    picture = Path(results[0]["image_path"]).read_bytes()
    captions = knn(client, text="", image=b64(picture), modality="text", num_images=2, indice_name="index").json()
    assert len(captions) == 2 and all(result["caption"].startswith("a ") for result in captions)

    metadata = client.post("/metadata", content=json.dumps({"ids": [results[0]["id"], 10**9], "indice_name": None}))
    assert metadata.json() == [
        {"id": results[0]["id"], "metadata": {k: results[0][k] for k in ("image", "image_path", "url")}}
    ]


def test_knn_service_refuses_bad_input_and_private_urls(client):
    assert knn(client, modality="image", num_images=3, indice_name=None).status_code == 400
    assert knn(client, text="x", modality="image", num_images="many").status_code == 422
    assert knn(client, text="x", modality="image", num_images=3, indice_name="laion5B").status_code == 400
    for url in [
        "http://127.0.0.1:1/x.jpg",
        "http://localhost/x.jpg",
        "http://10.1.2.3/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/x.jpg",
        "file:///etc/passwd",
    ]:
        response = knn(client, image_url=url, modality="image", num_images=3, indice_name=None)
        assert response.status_code == 400, url
        assert "refused" in response.json()["detail"] or "http or https" in response.json()["detail"]


def test_a_forged_host_header_changes_nothing(server):
    forged = {"Authorization": f"Bearer {TOKEN}", "Host": "evil.example", "X-Forwarded-Host": "evil.example"}
    with httpx.Client(base_url=server, headers=forged, timeout=60) as client:
        nearest = knn(client, text="a red circle", modality="image", num_images=3)
        found = nearest.json()
        responses = [
            nearest,
            client.post("/metadata", content=json.dumps({"ids": [found[0]["id"]]})),
            client.get("/search", params={"text": "a red circle", "k": 3}),
            client.get(f"/items/{found[0]['id']}"),
            client.get("/search/"),  # no redirect: Starlette would build its Location from the Host header
            client.get("/stats"),
            client.get("/docs"),
            client.get("/openapi.json"),
            client.get("/"),
        ]
    for response in responses:
        assert response.status_code in (200, 404), response.request.url
        assert b"evil.example" not in response.content
        assert "evil.example" not in str(response.headers)
    assert [result["url"] for result in found] == [f"/items/{result['id']}/image" for result in found]
    assert responses[1].json()[0]["metadata"]["url"] == f"/items/{found[0]['id']}/image"


def test_public_url_is_where_answers_point(library):
    root, _ = library
    with serving(root / "index", "--public-url", "https://photos.example.org/clipseek/") as url:
        forged = {"Host": "evil.example"}
        body = json.dumps({"text": "a red circle", "num_images": 1})
        result = httpx.post(f"{url}/knn-service", content=body, headers=forged).json()[0]
    assert result["url"] == f"https://photos.example.org/clipseek/items/{result['id']}/image"
    refused = CliRunner().invoke(cli, ["serve", "--public-url", "ftp://photos.example.org"])
    assert refused.exit_code == 2 and "is not an http(s) URL" in refused.output


def test_without_fetch_urls_image_url_is_off_timeouts_are_504_and_openapi_describes_the_api(library):
    root, _ = library
    with serving(root / "index", "--timeout", "0.001") as url:
        response = httpx.post(f"{url}/knn-service", json={"image_url": "https://example.com/a.jpg", "num_images": 1})
        assert response.status_code == 400 and "--fetch-urls" in response.json()["detail"]
        slow = httpx.post(
            f"{url}/classify", json={"images": [{"item": 1}], "labels": [f"label {n}" for n in range(500)]}
        )
        assert slow.status_code == 504 and "longer than 0.001 s" in slow.json()["detail"]
        paths = httpx.get(f"{url}/openapi.json").json()["paths"]
        assert {"/search", "/search/image", "/items/{item_id}/thumbnail", "/moderate", "/knn-service"} <= set(paths)
        assert "<title>clipseek</title>" in httpx.get(url).text
        assert httpx.get(f"{url}/health").status_code == 200


def test_a_minimum_score_is_a_cosine_or_match(client):
    """The demo model is trained with CLIP's softmax: no score of its own says "a match", and the answer says why."""
    scores = [hit["score"] for hit in client.get("/search", params={"text": "a large red circle"}).json()["hits"]]
    kept = client.get("/search", params={"text": "a large red circle", "min_score": scores[2]}).json()["hits"]
    assert [hit["score"] for hit in kept] == scores[:3]
    refused = client.post("/search", json={"text": "a large red circle", "min_score": "match"})
    assert refused.status_code == 400 and "trained with CLIP's softmax loss" in refused.json()["detail"]
    assert client.get("/search", params={"text": "red", "min_score": "likely"}).status_code == 422
    assert client.get("/search", params={"text": "red", "min_score": 1.5}).status_code == 422
