"""Hostile input from the served OpenAPI schema itself: schemathesis generates requests for
every operation (bounded in examples and time) against a real server on 127.0.0.1. Required:
no server errors, and every response matches the schema (status code, content type, body)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.config import Settings
from service.launcher import ServiceProcess

TOKENS = {"BNSERVE_ADMIN_TOKEN": "admin-token", "BNSERVE_DEBUG_TOKEN": "debug-token"}


@pytest.fixture(scope="module")
def fuzzed_server(demo_repository):
    with ServiceProcess(demo_repository, env={**TOKENS, "BNSERVE_LOG_LEVEL": "warning"}) as server:
        yield server


# The schema is built from the app object at collection time (the same code the server runs;
# the last test checks the served copy is identical), so no server is needed to collect.
OPENAPI = create_app(Settings(repository="/nonexistent")).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_survives_generated_input(case, fuzzed_server):
    token = (
        TOKENS["BNSERVE_DEBUG_TOKEN"]
        if "stat-drift" in case.path
        else TOKENS["BNSERVE_ADMIN_TOKEN"]
    )
    case.call_and_validate(
        base_url=fuzzed_server.url,
        headers={"authorization": f"Bearer {token}"},
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
        timeout=30,
    )


def test_served_schema_is_the_fuzzed_one(fuzzed_server):
    import httpx

    assert httpx.get(f"{fuzzed_server.url}/openapi.json").json() == OPENAPI


def test_server_survived_the_fuzzing(fuzzed_server):
    assert fuzzed_server.status("/v2/health/ready") == 200
    assert "Traceback" not in fuzzed_server.output()
