"""A flood of slow requests to `clipseek serve` with one worker and a short queue: those that find
no place are answered 503 with Retry-After, the rest are answered, and the server lives on. And
what work over its timeout still costs: a call still waiting is dropped, a running one finishes."""

import asyncio
import threading

import httpx
import pytest

from search.http.context import Workers
from tests.http_server import demo_index, serving

CLIENTS = 12  # each sends one slow request, all at once


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("queue")
    demo_index(root, count=6)
    return root


def _classify(url: str, client: int, answers: list) -> None:
    # Labels of its own for each client, so that no cache makes the work cheap: 500 texts to embed.
    labels = [f"a shape number {n} of client {client}" for n in range(500)]
    body = {"images": [{"item": 1}], "labels": labels}
    try:
        answers.append(httpx.post(f"{url}/classify", json=body, timeout=120))
    except httpx.HTTPError as error:
        answers.append(error)


def test_a_flood_beyond_the_queue_is_503_with_retry_after_and_the_server_lives_on(library):
    log = library / "server.log"
    with serving(library / "index", "--workers", "1", "--queue", "2", log=log) as url:
        answers: list = []
        clients = [threading.Thread(target=_classify, args=(url, n, answers)) for n in range(CLIENTS)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        statuses = sorted(getattr(answer, "status_code", repr(answer)) for answer in answers)
        assert set(statuses) <= {200, 503}, statuses
        assert 1 <= statuses.count(200) <= CLIENTS - 1 and statuses.count(503) >= 1, statuses
        for refused in (answer for answer in answers if answer.status_code == 503):
            assert int(refused.headers["Retry-After"]) >= 1
            assert "every worker is busy" in refused.json()["detail"]
        assert httpx.get(f"{url}/health").status_code == 200
        described = httpx.get(f"{url}/openapi.json").json()["paths"]["/classify"]["post"]["responses"]["503"]
        assert "Retry-After" in described["headers"]
        assert httpx.get(f"{url}/search", params={"text": "a red circle", "k": 1}).status_code == 200
    assert "Traceback" not in log.read_text()


def test_work_that_times_out_waiting_never_runs_and_running_work_keeps_its_worker():
    workers = Workers(1, queue=4)
    release, ran = threading.Event(), []

    def slow(name: str) -> str:
        ran.append(name)
        release.wait(10)
        return name

    async def flood() -> list:
        calls = [workers.call(0.2, slow, name) for name in ("running", "waiting")]
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(flood())
    assert [type(outcome) for outcome in outcomes] == [TimeoutError, TimeoutError]
    assert ran == ["running"]  # the first call keeps its thread; the second was dropped before it started
    release.set()
    assert asyncio.run(workers.call(5, slow, "next")) == "next"
    assert ran == ["running", "next"]
    workers.executor.shutdown()
