"""Property-based fuzzing of `clipseek serve` from its own OpenAPI description (schemathesis).

Every operation gets requests that fit the description and requests that break it, over a real
socket, to a server started with --token. Each is sent with the token and without it. Whatever a
client sends, the answer is never a 5xx, its status is one the description lists, and its body and
Content-Type are the ones described; without the token, every route that returns data is a 401.
The seed is fixed and the number of examples bounded, so a run is the same every time.
"""

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.http_server import demo_index, serving

TOKEN = "fuzz-token"
EXAMPLES = 100  # per operation and mode
OPEN = {"/health"}  # the only described route that needs no token
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    demo_index(root, count=12)
    # A server policy, so that a /moderate without one of its own is judged rather than refused.
    policy = root / "policy.json"
    policy.write_text(json.dumps({"concepts": {"red": {"prompts": ["a red circle"], "threshold": 0.6}}}))
    with serving(root / "index", "--token", TOKEN, "--policy", str(policy), "--timeout", "20") as url:
        yield url


@pytest.fixture(scope="module")
def operations(server):
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    # The token is sent by the test, with each request and left out of it, never made up.
    schema.config.generation.update(with_security_parameters=False)
    return [result.ok() for result in schema.get_all_operations()]


def _fuzz(operation, mode: GenerationMode, server: str) -> None:
    @settings(
        max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def requests(case):
        case.call_and_validate(base_url=server, headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)
        anonymous = case.call_and_validate(base_url=server, checks=CHECKS)
        if case.path not in OPEN:
            assert anonymous.status_code == 401, (case.method, case.path, anonymous.text[:200])

    requests()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_gets_a_5xx_or_an_answer_the_description_does_not_state(operations, server, mode):
    failures = {}
    for operation in operations:
        try:
            _fuzz(operation, mode, server)
        except Unsatisfiable:  # no request can break a description that takes anything (GET /stats, /items/{id})
            assert mode is GenerationMode.NEGATIVE, operation.label
        except Exception as error:  # every operation is fuzzed; all that fail are reported together
            failures[operation.label] = error
    assert not failures, "\n\n".join(f"{label}: {error}" for label, error in failures.items())


def test_the_description_names_the_bearer_scheme_and_the_open_routes(server):
    description = httpx.get(f"{server}/openapi.json").json()
    scheme = description["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, operations in description["paths"].items():
        for operation in operations.values():
            if path in OPEN:
                assert "security" not in operation and "401" not in operation["responses"]
            else:
                assert operation["security"] == [{"bearer": []}] and "401" in operation["responses"], path
