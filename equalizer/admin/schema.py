"""``GET /openapi.json``: the OpenAPI 3.0 description of the admin API (SPEC section 6).

The document is written by hand, next to the routes it describes, and the tests
hold the two together: every route Klein serves is in the document and every
operation in the document is a route (``tests/test_admin_openapi.py``), and
Schemathesis fuzzes the running API from this document, checking every answer
against it (``tests/integration/test_admin_fuzz.py``).

Request bodies are closed (``additionalProperties: false``) because the API
refuses unknown fields; response bodies are open, so a new read-only field is
not a breaking change for clients.
"""

from __future__ import annotations

import copy
from typing import Any

from equalizer import __version__
from equalizer.admin import schema_routing as routing
from equalizer.balancer.stats import TOP_COUNTERS, TOP_SHOWN
from equalizer.config.model import MAX_BACKEND_REQUESTS, MAX_WEIGHT
from equalizer.config.rules import (
    MAX_CAPACITY,
    MAX_CLIENT_ID_LENGTH,
    MAX_REFILL_RATE,
    MIN_REFILL_RATE,
)

MAX_PAGE = 1000
"""Largest page ``GET /buckets`` serves."""


_REFILL_RATE = {
    "type": "number", "minimum": 0, "maximum": MAX_REFILL_RATE,
    "description": f"tokens per second: 0 (never refills) or from {MIN_REFILL_RATE:g} "
                   f"to {MAX_REFILL_RATE:g}",
}

URL_PATTERN = '^[Hh][Tt][Tt][Pp][Ss]?://[!-"$-.0->@-~]+(/[!-"$->@-~]*)?$'
"""What a backend URL looks like: printable ASCII, http(s), a host, a path at most.

A necessary condition only: the port's range, for one, is checked by the API.
"""

_BY_STATUS = {
    "type": "object",
    "description": "answered requests by status class: 1xx .. 5xx",
    "additionalProperties": {"type": "integer", "minimum": 0},
    "example": {"1xx": 0, "2xx": 10, "3xx": 0, "4xx": 1, "5xx": 0},
}

JSON = "application/json"
BEARER = "bearerAuth"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema_name: str) -> dict[str, Any]:
    return {"content": {JSON: {"schema": _ref(schema_name)}}}


def _response(description: str, schema_name: str | None = None,
              headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description}
    if schema_name is not None:
        answer.update(_json_body(schema_name))
    if headers:
        answer["headers"] = headers
    return answer


def _error(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


_MAX_REQUESTS = {"type": "integer", "minimum": 0, "maximum": MAX_BACKEND_REQUESTS,
                 "description": "requests in flight at most (0 = no limit): a full backend "
                                "is no candidate, and requests wait in the pool queue"}
_BACKUP = {"type": "boolean",
           "description": "takes traffic only while no primary (non-backup) backend is "
                          "available"}
_NULLABLE_NUMBER = {"type": "number", "nullable": True}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "description": "Every refusal, here and from the proxy (SPEC 4.4).",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "description": "machine-readable, e.g. bad_request",
                             "example": "bad_request"},
                    "message": {"type": "string", "description": "for humans; names the field",
                                "example": "capacity: must be an integer"},
                },
            },
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "backends", "store"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "degraded", "down", "starting"]},
            "backends": {
                "type": "object",
                "required": ["healthy", "total"],
                "properties": {
                    "healthy": {"type": "integer", "minimum": 0},
                    "total": {"type": "integer", "minimum": 0},
                },
            },
            "store": {"type": "string", "enum": ["ok", "unavailable"]},
        },
    },
    "LastCheck": {
        "type": "object",
        "nullable": True,
        "description": "The latest active health check; null before the first one.",
        "required": ["ok", "status", "error", "at", "duration_ms"],
        "properties": {
            "ok": {"type": "boolean"},
            "status": {"type": "integer", "nullable": True,
                       "description": "the backend's status code; null when it did not answer"},
            "error": {"type": "string", "nullable": True},
            "at": {"type": "number", "description": "when, in Unix seconds"},
            "duration_ms": {"type": "number", "minimum": 0},
        },
    },
    "Backend": {
        "type": "object",
        "required": ["id", "url", "healthy", "enabled", "weight", "in_flight", "requests",
                     "failures", "latency_ms", "last_check"],
        "properties": {
            "id": {"type": "string", "example": "b1"},
            "url": {"type": "string", "example": "http://127.0.0.1:9001"},
            "pool": routing.POOL_PROPERTY,
            "healthy": {"type": "boolean", "nullable": True,
                        "description": "null (unknown) while active checks run and none has "
                                       "finished for this backend yet; it takes traffic"},
            "down_since": {"type": "number", "nullable": True,
                           "description": "when it was taken out (Unix seconds); null while "
                                          "healthy"},
            "enabled": {"type": "boolean"},
            "draining": {"type": "boolean",
                         "description": "being removed: takes no new requests"},
            "weight": {"type": "integer", "minimum": 1, "maximum": MAX_WEIGHT},
            "in_flight": {"type": "integer", "minimum": 0},
            "requests": {"type": "integer", "minimum": 0,
                         "description": "proxied requests answered; never health checks"},
            "by_status": _BY_STATUS,
            "failures": {"type": "integer", "minimum": 0,
                         "description": "failed attempts: connect errors and timeouts, no "
                                        "response in time, invalid or broken responses"},
            "retries": {"type": "integer", "minimum": 0,
                        "description": "requests sent on to another backend after a failure "
                                       "here"},
            "latency_ms": {
                "type": "object",
                "description": "over the recent window; null before the first request",
                "required": ["p50", "p99"],
                "properties": {"p50": _NULLABLE_NUMBER, "p99": _NULLABLE_NUMBER},
            },
            "last_check": _ref("LastCheck"),
            "max_requests": _MAX_REQUESTS,
            "backup": _BACKUP,
            "ejected_until": {"type": "number", "nullable": True,
                              "description": "while outlier detection has ejected the "
                                             "backend: when it comes back, in Unix seconds; "
                                             "null otherwise"},
            "ejections": {"type": "integer", "minimum": 0,
                          "description": "times outlier detection ejected it"},
        },
    },
    "BackendList": {
        "type": "object",
        "required": ["items", "total"],
        "properties": {
            "items": {"type": "array", "items": _ref("Backend")},
            "total": {"type": "integer", "minimum": 0},
        },
    },
    "BackendCreate": {
        "type": "object",
        "additionalProperties": False,
        "required": ["url"],
        "properties": {
            "url": {"type": "string", "pattern": URL_PATTERN,
                    "description": "an absolute http(s) URL with a host and a valid port, "
                                   "without query or fragment, naming a server not in the pool "
                                   "yet (else 409)",
                    "example": "http://127.0.0.1:9004"},
            "weight": {"type": "integer", "minimum": 1, "maximum": MAX_WEIGHT, "default": 1},
            "max_requests": {**_MAX_REQUESTS, "default": 0},
            "backup": {**_BACKUP, "default": False},
            "pool": routing.POOL_CREATE_PROPERTY,
        },
    },
    "BackendUpdate": {
        "type": "object",
        "additionalProperties": False,
        "description": "Only the fields given change.",
        "properties": {
            "weight": {"type": "integer", "minimum": 1, "maximum": MAX_WEIGHT},
            "enabled": {"type": "boolean"},
            "max_requests": _MAX_REQUESTS,
            "backup": _BACKUP,
        },
    },
    "Stats": {
        "type": "object",
        "required": ["uptime_seconds", "requests", "backends"],
        "properties": {
            **routing.STATS_PROPERTIES,
            "uptime_seconds": {"type": "number", "minimum": 0},
            "requests": {
                "type": "object",
                "required": ["total", "by_status", "rate_limited", "errors"],
                "properties": {
                    "total": {"type": "integer", "minimum": 0},
                    "by_status": _BY_STATUS,
                    "rate_limited": {"type": "integer", "minimum": 0},
                    "errors": {"type": "integer", "minimum": 0},
                    "retries": {"type": "integer", "minimum": 0},
                },
            },
            "version": {"type": "string", "example": "0.1.0"},
            "connections": {"type": "integer", "minimum": 0,
                            "description": "client connections open on the proxy port"},
            "store": {
                "type": "object",
                "description": "the bucket store and whether it is reachable now",
                "required": ["kind", "available"],
                "properties": {
                    "kind": {"type": "string", "enum": ["memory", "postgres"]},
                    "available": {"type": "boolean"},
                },
            },
            "limited_clients": {
                "type": "array",
                "maxItems": TOP_SHOWN,
                "description": f"the clients refused (429) most often since start, most "
                               f"first: at most {TOP_SHOWN}, from {TOP_COUNTERS} Space-Saving "
                               f"counters, so a count may be over by at most its error",
                "items": {
                    "type": "object",
                    "required": ["client", "count", "error"],
                    "properties": {
                        "client": {"type": "string", "description": "the rate-limit key"},
                        "count": {"type": "integer", "minimum": 1},
                        "error": {"type": "integer", "minimum": 0},
                    },
                },
            },
            "backends": {"type": "array", "items": _ref("Backend")},
            "buckets": {
                "type": "object",
                "description": "buckets held (postgres: rows in the table as of the last "
                               "sweep, null before it), full default buckets forgotten by "
                               "sweeps, new clients refused at rate_limit.max_buckets",
                "properties": {
                    "held": {"type": "integer", "minimum": 0, "nullable": True},
                    "swept": {"type": "integer", "minimum": 0},
                    "over_cap": {"type": "integer", "minimum": 0},
                },
            },
            "queue": {
                "type": "object",
                "description": "the pool queue (balancer.queue): requests waiting now for a "
                               "backend under its max_requests, its bounds, and how many "
                               "were queued, refused at once (queue full) and refused at "
                               "the timeout, with 503 overloaded",
                "properties": {
                    "length": {"type": "integer", "minimum": 0},
                    "max": {"type": "integer", "minimum": 0},
                    "timeout": {"type": "number", "minimum": 0},
                    "queued": {"type": "integer", "minimum": 0},
                    "refused": {"type": "integer", "minimum": 0},
                    "timed_out": {"type": "integer", "minimum": 0},
                },
            },
            "workers": {
                "type": "array",
                "description": "only with proxy.workers above 1: one entry per worker process "
                               "(its pid, null while it is being replaced; requests it "
                               "answered; in flight now; times its slot was restarted); the "
                               "figures above are their sum, at most 250 ms old",
                "items": {
                    "type": "object",
                    "required": ["pid", "requests", "in_flight", "restarts"],
                    "properties": {
                        "pid": {"type": "integer", "nullable": True},
                        "requests": {"type": "integer", "minimum": 0},
                        "in_flight": {"type": "integer", "minimum": 0},
                        "restarts": {"type": "integer", "minimum": 0},
                    },
                },
            },
        },
    },
    "Bucket": {
        "type": "object",
        "required": ["policy", "client_id", "capacity", "tokens", "refill_rate", "created_at",
                     "updated_at"],
        "properties": {
            "policy": routing.POLICY_PROPERTY,
            "client_id": {"type": "string", "description": "the rate-limit key's value"},
            "capacity": {"type": "integer", "minimum": 1, "maximum": MAX_CAPACITY},
            "tokens": {"type": "number", "minimum": 0, "maximum": MAX_CAPACITY,
                       "description": "as of this answer; at most capacity"},
            "refill_rate": _REFILL_RATE,
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
        },
    },
    "BucketList": {
        "type": "object",
        "required": ["items", "total", "limit", "offset"],
        "properties": {
            "items": {"type": "array", "items": _ref("Bucket"),
                      "description": "ordered by client_id (code-point order)"},
            "total": {"type": "integer", "minimum": 0},
            "limit": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
            "offset": {"type": "integer", "minimum": 0},
        },
    },
    "BucketCreate": {
        "type": "object",
        "additionalProperties": False,
        "required": ["client_id", "capacity"],
        "properties": {
            "client_id": {"type": "string", "minLength": 1, "maxLength": MAX_CLIENT_ID_LENGTH,
                          "pattern": "^[^\\u0000-\\u001f\\u007f]*$",
                          "not": {"enum": [".", ".."]},
                          "description": "the rate-limit key's value: UTF-8 text without "
                                         "control characters, not '.' or '..'"},
            "capacity": {"type": "integer", "minimum": 1, "maximum": MAX_CAPACITY},
            "tokens": {"type": "number", "minimum": 0, "maximum": MAX_CAPACITY,
                       "description": "at most capacity (else 400); default: capacity"},
            "refill_rate": {**_REFILL_RATE,
                            "description": _REFILL_RATE["description"] + "; default: "
                            "rate_limit.default's (400 when no default is configured)"},
            "policy": routing.POLICY_CREATE_PROPERTY,
        },
    },
    "BucketUpdate": {
        "type": "object",
        "additionalProperties": False,
        "description": "Only the fields given change. The bucket is first refilled up to now; "
                       "a lower capacity clamps the tokens held; tokens above the capacity "
                       "are 400.",
        "properties": {
            "capacity": {"type": "integer", "minimum": 1, "maximum": MAX_CAPACITY},
            "tokens": {"type": "number", "minimum": 0, "maximum": MAX_CAPACITY,
                       "description": "at most the capacity (the new one when given, else 400)"},
            "refill_rate": _REFILL_RATE,
        },
    },
}

_RESPONSES: dict[str, Any] = {
    "BadRequest": _response("invalid JSON, an unknown field, a wrong type or an out-of-range "
                            "value (the message names the field), or a path that is not UTF-8 "
                            "once percent-decoded; nothing changed", "Error"),
    "Unauthorized": _response(
        "a token is configured and the request lacks 'Authorization: Bearer TOKEN'", "Error",
        {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}}),
    "NotFound": _response("no such resource", "Error"),
    "Conflict": _response("it exists already; nothing changed", "Error"),
    "DrainCancelled": _response("a configuration reload listed the backend again while it "
                                "drained: the file wins and the backend stays", "Error"),
    "ForbiddenOrigin": _response("forbidden_origin: a browser request whose Origin is not this "
                                 "API's own (scheme, Host); nothing changed", "Error"),
    "PayloadTooLarge": _response("request body over 64 KiB, refused unread", "Error"),
    "StoreUnavailable": _response("the bucket store is unreachable (store_unavailable)",
                                  "Error"),
}

_LOCATION = {"Location": {"schema": {"type": "string"}, "required": True,
                          "description": "the new resource's path"}}

_LIMIT = {"name": "limit", "in": "query", "required": False,
          "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 50}}
_OFFSET = {"name": "offset", "in": "query", "required": False,
           "schema": {"type": "integer", "minimum": 0, "default": 0}}
_BACKEND_ID = {"name": "backend_id", "in": "path", "required": True,
               "description": "the id GET /backends reports",
               "schema": {"type": "string", "pattern": "^[^/]+$"}}
_CLIENT_ID = {"name": "client_id", "in": "path", "required": True,
              "description": "the bucket's client_id, percent-encoded",
              "schema": {"type": "string", "minLength": 1}}

_BUCKET_LINKS = {
    name: {"operationId": operation, "parameters": {"client_id": "$response.body#/client_id"}}
    for name, operation in (("GetBucket", "getBucket"), ("UpdateBucket", "updateBucket"),
                            ("DeleteBucket", "deleteBucket"))
}
_BACKEND_LINKS = {
    name: {"operationId": operation, "parameters": {"backend_id": "$response.body#/id"}}
    for name, operation in (("GetBackend", "getBackend"), ("ChangeBackend", "changeBackend"),
                            ("RemoveBackend", "removeBackend"))
}


def _operation(operation_id: str, summary: str, responses: dict[str, Any], *,
               tags: list[str], body: str | None = None,
               parameters: list[dict[str, Any]] | None = None,
               open_: bool = False, writes: bool = False) -> dict[str, Any]:
    """One operation, with the answers every operation can give added.

    The guard in front of the routes answers 401 (unless ``open_``) and 413 for
    any request, 403 for a cross-origin one that ``writes``, and 400 for a path
    that is not UTF-8 or has a dot segment, so the operations list them.
    """
    operation: dict[str, Any] = {"operationId": operation_id, "summary": summary, "tags": tags}
    if parameters:
        operation["parameters"] = parameters
    if any(parameter["in"] == "path" for parameter in parameters or ()):
        responses = {"400": _error("BadRequest"), **responses}
    if writes:
        responses = {**responses, "403": _error("ForbiddenOrigin")}
    if body is not None:
        operation["requestBody"] = {"required": True, **_json_body(body)}
        responses = {"400": _error("BadRequest"), **responses}
    if open_:
        operation["security"] = []
    else:
        responses = {**responses, "401": _error("Unauthorized")}
    operation["responses"] = dict(sorted({**responses,
                                          "413": _error("PayloadTooLarge")}.items()))
    return operation


def _paths() -> dict[str, Any]:
    pools = {"/pools": {"get": _operation(
        "listPools", "Every pool with its backends (SPEC 8)",
        {"200": _response("the pools", "PoolList")}, tags=["backends"])}}
    return {**_observability_paths(), **pools, **_backend_paths(), **_bucket_paths()}


def _observability_paths() -> dict[str, Any]:
    observe = ["observability"]
    return {
        "/health": {"get": _operation(
            "health", "Liveness and readiness; open even when a token is configured",
            {"200": _response("ok or degraded", "Health"),
             "503": _response("down: no backend is healthy; starting: the store's first "
                              "connection attempt is not over yet (at most 10 s)", "Health")},
            tags=observe, open_=True)},
        "/stats": {"get": _operation(
            "stats", "Traffic counters and every backend's state",
            {"200": _response("the figures", "Stats")}, tags=observe)},
        "/metrics": {"get": _operation(
            "metrics", "The same figures in the Prometheus text exposition format",
            {"200": {"description": "Prometheus text format 0.0.4",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}},
            tags=observe)},
        "/dashboard": {"get": _operation(
            "dashboard", "A live HTML view of /stats (polls it every second); open even "
            "when a token is configured: the page holds no data, it asks for the token and "
            "sends it on its own calls",
            {"200": {"description": "the page",
                     "content": {"text/html": {"schema": {"type": "string"}}}}},
            tags=observe, open_=True)},
        "/openapi.json": {"get": _operation(
            "openapi", "This document",
            {"200": {"description": "OpenAPI 3.0",
                     "content": {JSON: {"schema": {"type": "object"}}}}},
            tags=observe)},
    }


def _backend_paths() -> dict[str, Any]:
    backend_ops = ["backends"]
    return {
        "/backends": {
            "get": _operation("listBackends", "Every backend, in pool order",
                              {"200": _response("the backends", "BackendList")},
                              tags=backend_ops),
            "post": _operation(
                "addBackend", "Add a backend; it takes traffic at once",
                {"201": {**_response("added", "Backend", _LOCATION), "links": _BACKEND_LINKS},
                 "404": _error("NotFound"), "409": _error("Conflict")},
                tags=backend_ops, body="BackendCreate", writes=True),
        },
        "/backends/{backend_id}": {
            "get": _operation("getBackend", "One backend",
                              {"200": _response("the backend", "Backend"),
                               "404": _error("NotFound")},
                              tags=backend_ops, parameters=[_BACKEND_ID]),
            "put": _operation("changeBackend", "Change a backend's weight, enabled flag, "
                                               "max_requests or backup flag",
                              {"200": _response("the backend as changed", "Backend"),
                               "404": _error("NotFound")},
                              tags=backend_ops, parameters=[_BACKEND_ID], body="BackendUpdate",
                              writes=True),
            "delete": _operation(
                "removeBackend",
                "Drain, then remove: no new requests; answers once those in flight finished",
                {"204": {"description": "removed"}, "404": _error("NotFound"),
                 "409": _error("DrainCancelled")},
                tags=backend_ops, parameters=[_BACKEND_ID], writes=True),
        },
    }


def _bucket_paths() -> dict[str, Any]:
    bucket_ops = ["buckets"]
    store_down = {"503": _error("StoreUnavailable")}
    return {
        "/buckets": {
            "get": _operation("listBuckets", "A page of buckets, ordered by client_id",
                              {"200": _response("the page", "BucketList"),
                               "400": _error("BadRequest"), "404": _error("NotFound"),
                               **store_down},
                              tags=bucket_ops,
                              parameters=[_LIMIT, _OFFSET, routing.POLICY_PARAMETER]),
            "post": _operation(
                "createBucket", "Create a client's bucket",
                {"201": {**_response("created", "Bucket", _LOCATION), "links": _BUCKET_LINKS},
                 "404": _error("NotFound"), "409": _error("Conflict"), **store_down},
                tags=bucket_ops, body="BucketCreate", writes=True),
        },
        "/buckets/{client_id}": {
            "get": _operation("getBucket", "A client's bucket, tokens as of now",
                              {"200": _response("the bucket", "Bucket"),
                               "404": _error("NotFound"), **store_down},
                              tags=bucket_ops, parameters=[_CLIENT_ID, routing.POLICY_PARAMETER]),
            "put": _operation("updateBucket", "Change some of capacity, tokens, refill_rate",
                              {"200": _response("the bucket as changed", "Bucket"),
                               "404": _error("NotFound"), **store_down},
                              tags=bucket_ops, parameters=[_CLIENT_ID, routing.POLICY_PARAMETER],
                              body="BucketUpdate",
                              writes=True),
            "delete": _operation("deleteBucket", "Delete a client's bucket",
                                 {"204": {"description": "deleted"}, "404": _error("NotFound"),
                                  **store_down},
                                 tags=bucket_ops,
                                 parameters=[_CLIENT_ID, routing.POLICY_PARAMETER], writes=True),
        },
    }


_DOCUMENT: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "equalizer admin API",
        "version": __version__,
        "description": (
            "Health, statistics, metrics, backends and rate-limit buckets of a running "
            "equalizer. JSON in and out; every error is "
            '`{"error": {"code", "message"}}`. When a token is configured, every operation '
            "except `GET /health` and `GET /dashboard` (and HEAD) needs "
            "`Authorization: Bearer TOKEN` (the scheme in any case). A request other than "
            "GET, HEAD or OPTIONS whose `Origin` header "
            "names another origin than the request's own (scheme and `Host`) is 403 "
            "`forbidden_origin`, before the token check. An unknown path is 404 and a method "
            "a path does not serve is 405 with `Allow`, both after the token check. A path "
            "with a `.` or `..` segment (percent-encoded or not) is 400, and so is a JSON "
            "body naming a key twice. Bucket operations made while the service is starting "
            "wait (at most 10 s) for the store's first connection attempt."
        ),
        "license": {"name": "MIT"},
    },
    "tags": [
        {"name": "observability", "description": "health, stats, metrics, dashboard"},
        {"name": "backends", "description": "the pool, changed at run time"},
        {"name": "buckets", "description": "token buckets, in either store"},
    ],
    "security": [{BEARER: []}],
    "paths": _paths(),
    "components": {
        "securitySchemes": {BEARER: {"type": "http", "scheme": "bearer",
                                     "description": "admin.token or EQUALIZER_ADMIN_TOKEN"}},
        "schemas": {**_SCHEMAS, **routing.SCHEMAS},
        "responses": _RESPONSES,
    },
}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.0 document of the admin API (a fresh copy the caller may change)."""
    return copy.deepcopy(_DOCUMENT)
