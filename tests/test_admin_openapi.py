"""GET /openapi.json: the document is valid OpenAPI and describes exactly the routes served."""

from __future__ import annotations

import json
import re

from openapi_spec_validator import validate
from treq.testing import StubTreq
from twisted.internet.task import Clock

from equalizer.admin.api import AdminAPI
from equalizer.admin.schema import openapi_document
from equalizer.balancer.pool import BackendPool
from equalizer.balancer.stats import TrafficStats
from equalizer.buckets.memory import MemoryStore
from tests.helpers import result_of

ADDED_BY_WERKZEUG = {"HEAD", "OPTIONS"}
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def served_operations() -> set[tuple[str, str]]:
    """(METHOD, /path/{param}) for every route the Klein app serves."""
    operations = set()
    for rule in AdminAPI.app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in rule.methods - ADDED_BY_WERKZEUG:
            operations.add((method, path))
    return operations


def documented_operations(document: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in document["paths"].items()
            for method in item if method in HTTP_METHODS}


def test_document_is_valid_openapi() -> None:
    """The document passes the OpenAPI specification validator."""
    validate(openapi_document())


def test_every_route_is_documented_and_every_operation_is_served() -> None:
    """The routes Klein serves and the operations the document lists are the same set."""
    served = served_operations()
    documented = documented_operations(openapi_document())
    assert served - documented == set(), "served but not documented"
    assert documented - served == set(), "documented but not served"
    assert ("GET", "/metrics") in served
    assert ("GET", "/dashboard") in served
    assert ("GET", "/openapi.json") in served


def test_every_operation_but_health_and_the_page_requires_the_bearer_token() -> None:
    """Only GET /health and GET /dashboard (a page without data) opt out of the
    document-wide bearer security requirement."""
    document = openapi_document()
    assert document["security"] == [{"bearerAuth": []}]
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["bearerAuth"]["description"]}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if (method, path) in {("get", "/health"), ("get", "/dashboard")}:
                assert operation["security"] == []
                assert "401" not in operation["responses"]
            else:
                assert "security" not in operation
                assert "401" in operation["responses"], (method, path)


def test_guard_answers_are_documented() -> None:
    """Writing operations list the 403 of the Origin check, operations with a path parameter
    the 400 of a non-UTF-8 path, and removeBackend the 409 of a reload that keeps it."""
    for path, item in openapi_document()["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            writes = method in {"post", "put", "delete"}
            assert ("403" in responses) is writes, (method, path)
            if writes:
                assert responses["403"] == {"$ref": "#/components/responses/ForbiddenOrigin"}
            if "{" in path:
                assert "400" in responses, (method, path)
    removal = openapi_document()["paths"]["/backends/{backend_id}"]["delete"]["responses"]
    assert removal["409"] == {"$ref": "#/components/responses/DrainCancelled"}


def test_request_bodies_are_closed_and_constrained() -> None:
    """Request bodies refuse unknown fields and carry SPEC 6's ranges."""
    schemas = openapi_document()["components"]["schemas"]
    for name in ("BucketCreate", "BucketUpdate", "BackendCreate", "BackendUpdate"):
        assert schemas[name]["additionalProperties"] is False, name
    create = schemas["BucketCreate"]["properties"]
    assert create["capacity"]["type"] == "integer" and create["capacity"]["minimum"] == 1
    assert create["tokens"] == {**create["tokens"], "type": "number", "minimum": 0}
    assert create["refill_rate"] == {**create["refill_rate"], "type": "number", "minimum": 0}
    weight = schemas["BackendCreate"]["properties"]["weight"]
    assert (weight["minimum"], weight["maximum"]) == (1, 1000)
    assert schemas["BackendUpdate"]["properties"]["enabled"] == {"type": "boolean"}
    limit, offset, policy = openapi_document()["paths"]["/buckets"]["get"]["parameters"]
    assert (policy["name"], policy["schema"]["default"]) == ("policy", "default")
    assert (limit["schema"]["minimum"], limit["schema"]["maximum"]) == (1, 1000)
    assert offset["schema"]["minimum"] == 0


def test_openapi_route_serves_the_document() -> None:
    """GET /openapi.json answers 200 with the document as JSON."""
    clock = Clock()
    api = AdminAPI(BackendPool([]), TrafficStats(started=0), clock, MemoryStore(clock), None)
    response = result_of(StubTreq(api.app.resource()).get("http://admin/openapi.json"))
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert json.loads(result_of(response.content())) == openapi_document()
