"""Schema-driven fuzzing (schemathesis) of the live generator API on 127.0.0.1: bounded, derandomised
examples per operation, valid and invalid, and no answer is a 5xx or strays from the OpenAPI document."""
from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,  # noqa: E402
                                 response_schema_conformance, status_code_conformance)

from .serve_fixtures import LiveServer, make_app  # noqa: E402

# (positive, negative) examples per operation: /reference runs the 50-step teacher, so fewer there
EXAMPLES = {"/generate": (30, 30), "/reference": (4, 12), "/health": (2, 0)}  # GET /health has no input to corrupt
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def live():
    with LiveServer(make_app()) as server:
        yield server


def test_fuzz_openapi_no_server_errors(live):
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert sorted(op.path for op in operations) == ["/generate", "/health", "/reference"]
    seen: dict[tuple[str, str], set[int]] = {}
    for op in operations:
        for mode, n in zip((GenerationMode.POSITIVE, GenerationMode.NEGATIVE), EXAMPLES[op.path]):
            if n == 0:
                continue
            checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])

            @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call(base_url=live.url, timeout=60)
                seen.setdefault((op.path, mode.value), set()).add(response.status_code)
                case.validate_response(response, checks=checks)

            run()
    print("statuses seen:", seen)
    # the fuzzing reached both the model and the validation
    assert 200 in seen[("/generate", "positive")] and 422 in seen[("/generate", "negative")], seen
