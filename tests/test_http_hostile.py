"""Hostile requests to `clipseek serve` over a real socket: each is a 4xx that says why, never a 500
nor a traceback in the server's log."""

import json
import socket
import time

import httpx
import numpy as np
import pytest

from indexer.errors import QueryError
from search.engine import LABEL_TEMPLATE, SearchEngine
from search.query import Query
from tests.http_server import demo_index, serving

BEYOND_64_BITS = 2**64
LONE_SURROGATE = b'"\\ud800"'  # JSON's escape for half of a UTF-16 pair, alone


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    demo_index(root, count=12)
    return root


@pytest.fixture(scope="module")
def server_log(library):
    return library / "server.log"


@pytest.fixture(scope="module")
def server(library, server_log):
    with serving(library / "index", log=server_log) as url:
        yield url


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def ids(server):
    """A stored picture's id and a stored caption's id."""
    picture = httpx.get(f"{server}/search", params={"text": "a red circle", "k": 1}).json()["hits"][0]["id"]
    caption = httpx.get(f"{server}/search", params={"text": "a red circle", "modality": "text", "k": 1})
    return picture, caption.json()["hits"][0]["id"]


def raw_json(client, path: str, body: bytes) -> httpx.Response:
    return client.post(path, content=body, headers={"Content-Type": "application/json"})


def knn_body(**fields) -> bytes:
    return json.dumps({"num_images": 1, **fields}).encode()


# -- ids and counts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "loc"),
    [
        ("/search", {"item": BEYOND_64_BITS}, ["body", "item"]),
        ("/search", {"item": 2**63}, ["body", "item"]),
        ("/search", {"item": -1}, ["body", "item"]),
        ("/search", {"item": True}, ["body", "item"]),
        ("/search", {"text": "a circle", "k": BEYOND_64_BITS}, ["body", "k"]),
        ("/search", {"text": "a circle", "k": True}, ["body", "k"]),
        ("/search", {"terms": [{"item": BEYOND_64_BITS}]}, ["body", "terms", 0, "item"]),
        ("/classify", {"images": [{"item": BEYOND_64_BITS}], "labels": ["a", "b"]}, ["body", "images", 0, "item"]),
        ("/moderate", {"items": [{"item": False}]}, ["body", "items", 0, "item"]),
        ("/metadata", {"ids": [BEYOND_64_BITS]}, ["body", "ids", 0]),
        ("/metadata", {"ids": [-3]}, ["body", "ids", 0]),
        ("/metadata", {"ids": [True]}, ["body", "ids", 0]),
        ("/knn-service", {"text": "a circle", "num_images": BEYOND_64_BITS}, ["body", "num_images"]),
        ("/knn-service", {"text": "a circle", "num_images": True}, ["body", "num_images"]),
        ("/knn-service", {"text": "a circle", "num_result_ids": -BEYOND_64_BITS}, ["body", "num_result_ids"]),
    ],
)
def test_ids_and_counts_beyond_64_bits_negative_or_boolean_are_422(client, path, body, loc):
    response = client.post(path, json=body)
    assert response.status_code == 422
    problem = response.json()["detail"][0]
    assert problem["loc"] == loc
    bounds = ("less than or equal to 9007199254740991", "greater than or equal to", "not true or false")
    assert any(words in problem["msg"] for words in bounds)


def test_ids_and_counts_in_a_url_or_a_form_are_bounded_too(client):
    response = client.get("/search", params={"item": BEYOND_64_BITS})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["query", "item"]
    response = client.get("/search", params={"text": "a circle", "k": BEYOND_64_BITS})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["query", "k"]
    response = client.post("/search/image", files={"image": ("q.png", b"x")}, data={"k": str(BEYOND_64_BITS)})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "k"]


@pytest.mark.parametrize("path", ["/items/١٢", "/items/١/image", "/items/١/thumbnail", "/items/１", "/items/²"])
def test_path_ids_are_ascii_digits_only(client, path):
    # int() reads Arabic-Indic and full-width digits; an id in a path is 0-9 and nothing else.
    response = client.get(path)
    assert response.status_code == 404 and response.json()["detail"].startswith("no item")
    assert client.get("/items/1").json()["id"] == 1


# -- text that is not Unicode --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/search", b'{"text": ' + LONE_SURROGATE + b"}"),
        ("/search", b'{"text": "a circle", "collection": ' + LONE_SURROGATE + b"}"),
        ("/classify", b'{"images": [{"item": 1}], "labels": [' + LONE_SURROGATE + b', "b"]}'),
        ("/moderate", b'{"items": [{"text": "x"}], "policy": {"concepts": {' + LONE_SURROGATE + b": {}}}}"),
        ("/knn-service", b'{"text": "a \\udfff circle", "num_images": 1}'),
    ],
)
def test_lone_surrogates_in_json_are_400(client, path, body):
    response = raw_json(client, path, body)
    assert response.status_code == 400
    assert "lone surrogate" in response.json()["detail"]


def test_a_surrogate_pair_is_text(client):
    # \ud83d\ude00 is one emoji written as a pair: valid, so the search runs.
    assert raw_json(client, "/search", b'{"text": "a red circle \\ud83d\\ude00"}').status_code == 200


@pytest.mark.parametrize(
    "query", ["text=%ED%A0%80", "text=a+circle&collection=%FF", "text=%C3", "item=1&path=%ED%BF%BF"]
)
def test_query_strings_that_are_not_utf8_are_400(client, query):
    response = client.get(f"/search?{query}")
    assert response.status_code == 400
    assert response.json()["detail"] == "the query string is not UTF-8 text once percent-decoded"


def test_a_body_that_is_not_utf8_is_400(client):
    for path in ("/search", "/knn-service"):
        response = raw_json(client, path, b'{"text": "caf\xe9"}')
        assert response.status_code == 400 and response.json()["detail"] == "the request body is not UTF-8 text"


# -- deep nesting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [40, 100_000])
@pytest.mark.parametrize("path", ["/search", "/moderate", "/knn-service"])
def test_deeply_nested_json_is_400(client, path, depth):
    nested = b"[" * depth + b"]" * depth
    body = b'{"items": [{"text": "x"}], "policy": {"concepts": ' + nested + b"}}" if path == "/moderate" else nested
    response = raw_json(client, path, body)
    assert response.status_code == 400
    assert response.json()["detail"] == "the request's JSON nests deeper than 32 levels"


def test_brackets_inside_strings_are_not_nesting(client):
    response = client.post("/search", json={"text": "a red circle " + "[{" * 100 + '\\"' + "}]" * 100, "k": 1})
    assert response.status_code == 200


# -- the label template ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template", ["{0.__class__} {}", "{:>99999999}", "a {0} shape", "a {label} shape", "{!r}", "{} {", "a shape"]
)
def test_the_label_template_is_no_format_string(client, ids, template):
    picture, _ = ids
    body = {"images": [{"item": picture}], "labels": ["red", "blue"], "template": template}
    response = client.post("/classify", json=body)
    assert response.status_code == 422
    problem = response.json()["detail"][0]
    assert problem["loc"] == ["body", "template"] and "the label goes where {} is" in problem["msg"]


def test_every_plain_placeholder_takes_the_label(client, ids, library, monkeypatch):
    picture, _ = ids
    body = {"images": [{"item": picture}], "labels": ["red", "blue"], "template": "a {} circle, {} all over"}
    assert client.post("/classify", json=body).status_code == 200
    with SearchEngine.open(library / "index") as engine:
        with pytest.raises(QueryError, match="no other braces"):
            engine.classify([picture], ["red", "blue"], "{0.__class__} {}")
        embedded = []
        embed_texts = engine.encoder.embed_texts
        monkeypatch.setattr(engine.encoder, "embed_texts", lambda texts: embedded.extend(texts) or embed_texts(texts))
        engine.classify([picture], ["red", "blue"], "a {} circle, {} all over")
    assert embedded == ["a red circle, red all over", "a blue circle, blue all over"]


# -- numbers that are not finite -------------------------------------------------------------------


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_nan_or_infinite_numbers_are_400(client, number):
    vector = b"[" + b", ".join([number] + [b"0.1"] * 63) + b"]"
    response = client.post("/knn-service", content=b'{"num_images": 1, "embedding_input": ' + vector + b"}")
    assert response.status_code == 400
    assert number.decode().lstrip("-") in response.json()["detail"]
    weighted = raw_json(client, "/search", b'{"terms": [{"text": "a circle", "weight": ' + number + b"}]}")
    assert weighted.status_code == 400


def test_a_vector_of_huge_finite_numbers_is_a_direction(client):
    response = client.post("/knn-service", content=knn_body(embedding_input=[1e308] * 64))
    assert response.status_code == 200 and len(response.json()) == 1


def test_the_python_api_refuses_a_vector_that_is_not_finite():
    with pytest.raises(QueryError, match="finite"):
        Query.vector([np.nan] + [0.1] * 63)


# -- items of the wrong modality -------------------------------------------------------------------


def test_a_caption_where_a_picture_is_needed_is_400(client, ids):
    _, caption = ids
    policy = {"concepts": {"red": {"prompts": ["a red circle"], "threshold": 0.5}}}
    for path, body in [
        ("/classify", {"images": [{"item": caption}], "labels": ["red", "blue"]}),
        ("/moderate", {"items": [{"item": caption}], "policy": policy}),
    ]:
        response = client.post(path, json=body)
        assert response.status_code == 400
        assert response.json()["detail"] == f"item {caption} is a caption, not a picture"
    for suffix in ("image", "thumbnail"):
        assert client.get(f"/items/{caption}/{suffix}").status_code == 400
    # A caption is a fine query, though: text → picture search by a stored caption.
    assert client.post("/search", json={"item": caption, "k": 1}).status_code == 200


# -- clients that go away --------------------------------------------------------------------------


def test_a_client_leaving_mid_upload_leaves_one_log_line(server, server_log):
    port = int(server.rsplit(":", 1)[1])
    heads = [
        b"POST /search/image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        b'Content-Length: 100000\r\n\r\n--x\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        + b"\0"
        * 1000,
        b"POST /knn-service HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b'{"text": "a red',
    ]
    for head in heads:
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(head)
            time.sleep(0.3)  # the server reads what was sent before the connection closes
    deadline = time.monotonic() + 10
    while server_log.read_text().count("went away") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    printed = server_log.read_text()
    assert "went away during POST /search/image after sending" in printed
    assert "went away during POST /knn-service after sending 15 bytes of its body" in printed
    assert "Traceback" not in printed and "ClientDisconnect" not in printed
    assert httpx.get(f"{server}/health").status_code == 200


# -- the OpenAPI description -----------------------------------------------------------------------


def test_openapi_states_the_limits_and_the_refusals(client):
    schema = client.get("/openapi.json").json()
    models = schema["components"]["schemas"]
    item = models["ImageRef"]["properties"]["item"]["anyOf"][0]
    assert (item["minimum"], item["maximum"]) == (1, 2**53 - 1)
    assert models["SearchRequest"]["properties"]["k"]["maximum"] == 2**53 - 1
    assert models["ClassifyRequest"]["properties"]["template"]["pattern"] == LABEL_TEMPLATE
    paths = schema["paths"]
    assert {"400", "404", "413", "422"} <= set(paths["/search"]["post"]["responses"])
    assert {"400", "422"} <= set(paths["/knn-service"]["post"]["responses"])
    refusal = paths["/search"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert refusal == {"$ref": "#/components/schemas/ErrorMessage"}


# -- found by the fuzzer (tests/test_http_fuzz.py) -------------------------------------------------


def test_a_query_with_nothing_to_search_is_422_in_the_described_shape(client):
    # The answer was {"detail": "give ..."}, where the description promises a list of problems.
    for response, where in [
        (client.get("/search", params={"k": 3}), "query"),
        (client.post("/search", json={"k": 3}), "body"),
        (client.post("/search", json={"text": None, "terms": []}), "body"),
    ]:
        assert response.status_code == 422
        problem = response.json()["detail"][0]
        assert problem["loc"] == [where] and "give a text" in problem["msg"]


def test_without_the_token_a_request_is_401_before_its_body_or_query_is_read(library):
    # The body was parsed first: a client without the token got 400 or 422, after the server had
    # parsed as much JSON as it sent.
    with serving(library / "index", "--token", "s3cret") as url, httpx.Client(base_url=url) as anonymous:
        for body in [b"[" * 100_000, b'{"text": NaN}', b"{not json", b'{"text": ' + LONE_SURROGATE + b"}"]:
            assert raw_json(anonymous, "/search", body).status_code == 401
            assert raw_json(anonymous, "/knn-service", body).status_code == 401
        assert anonymous.get("/search?text=%FF").status_code == 401
        assert anonymous.get("/health").status_code == 200


def test_inline_policies_labels_and_filters_are_bounded(client, ids):
    picture, _ = ids
    concept = {"prompts": ["a red circle"], "threshold": 0.5}
    many = {f"concept {n}": concept for n in range(65)}
    for path, body, loc in [
        ("/moderate", {"items": [{"item": picture}], "policy": {"concepts": many}}, ["body", "policy", "concepts"]),
        (
            "/moderate",
            {"items": [{"item": picture}], "policy": {"concepts": {"c": {**concept, "prompts": ["a"] * 33}}}},
            ["body", "policy", "concepts", "c", "prompts"],
        ),
        ("/classify", {"images": [{"item": picture}], "labels": ["red", "x" * 2001]}, ["body", "labels", 1]),
        ("/classify", {"images": [{"item": picture}], "labels": ["red"] * 1001}, ["body", "labels"]),
        ("/search", {"text": "a circle", "collection": "x" * 201}, ["body", "collection"]),
    ]:
        response = client.post(path, json=body)
        assert response.status_code == 422, (path, response.text[:300])
        assert response.json()["detail"][0]["loc"][: len(loc)] == loc


def test_openapi_states_which_parts_of_a_query_go_together(client):
    models = client.get("/openapi.json").json()["components"]["schemas"]
    required = {
        name: [branch["required"] for branch in models[name][key]]
        for name, key in [
            ("Term", "oneOf"),
            ("ImageRef", "oneOf"),
            ("SearchRequest", "anyOf"),
            ("ModerateItem", "anyOf"),
        ]
    }
    assert required == {
        "Term": [["text"], ["image"], ["item"]],
        "ImageRef": [["image"], ["item"]],
        "SearchRequest": [["text"], ["image"], ["item"], ["terms"]],
        "ModerateItem": [["image"], ["item"], ["text"]],
    }
    assert models["ModerateItem"]["not"]["allOf"][0]["required"] == ["image"]
    assert models["InlinePolicy"]["properties"]["concepts"]["anyOf"][0]["maxProperties"] == 64


def test_a_null_in_an_inline_policy_counts_as_left_out(client, ids):
    # The description allows null for weights; the policy reader took it for a value and refused it.
    picture, _ = ids
    concept = {"prompts": ["a red circle"], "threshold": 0.5, "review": None, "weights": None}
    policy = {"weights": None, "concepts": {"red": concept}, "blocklists": None}
    response = client.post("/moderate", json={"items": [{"item": picture}], "policy": policy})
    assert response.status_code == 200 and response.json()["results"][0]["concepts"][0]["concept"] == "red"


def test_an_empty_label_is_422_and_knn_service_describes_its_query(client, ids):
    picture, _ = ids
    response = client.post("/classify", json={"images": [{"item": picture}], "labels": ["", ""]})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "labels", 0]
    schema = client.get("/openapi.json").json()["paths"]["/knn-service"]["post"]["requestBody"]
    branches = schema["content"]["application/json"]["schema"]["anyOf"]
    assert [branch["required"] for branch in branches] == [["text"], ["image"], ["image_url"], ["embedding_input"]]
    assert client.post("/knn-service", json={"text": "", "num_images": 1}).status_code == 400


@pytest.mark.parametrize("method", ["OPTIONS", "PUT", "DELETE"])
def test_a_method_not_allowed_names_every_method_of_the_path(client, method):
    # GET and POST /search are two routes; the 405 named only the first one's method.
    response = client.request(method, "/search")
    assert response.status_code == 405
    assert {"GET", "POST"} <= set(response.headers["Allow"].split(", "))
    assert client.request(method, "/classify").headers["Allow"] == "POST"
