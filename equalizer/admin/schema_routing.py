"""The parts of the admin OpenAPI document that pools, routes and policies add (SPEC 8);
``schema`` merges them into the document."""

from __future__ import annotations

from typing import Any

POOL_PROPERTY = {"type": "string", "example": "default",
                 "description": "the pool the backend is in (SPEC 8)"}

POOL_CREATE_PROPERTY = {"type": "string", "default": "default",
                        "description": "the pool to add the backend to: default or a name "
                                       "under pools: (else 404)"}

POLICY_PROPERTY = {"type": "string", "example": "default",
                   "description": "the rate-limit policy the bucket belongs to (SPEC 8); "
                                  "a bucket is identified by (policy, client_id)"}

POLICY_CREATE_PROPERTY = {"type": "string", "default": "default",
                          "description": "default or a name under rate_limit.policies "
                                         "(else 404); tokens and refill_rate default to that "
                                         "policy's default bucket"}

POLICY_PARAMETER = {"name": "policy", "in": "query", "required": False,
                    "description": "the rate-limit policy (SPEC 8): default or a name under "
                                   "rate_limit.policies (else 404)",
                    "schema": {"type": "string", "default": "default"}}

_REF = "#/components/schemas/"

SCHEMAS: dict[str, Any] = {
    "Pool": {
        "type": "object",
        "required": ["name", "strategy", "queue", "backends"],
        "properties": {
            "name": {"type": "string", "example": "api",
                     "description": "default (balancer:) or a name under pools:"},
            "strategy": {"type": "string", "example": "least_connections"},
            "queue": {"type": "object", "description": "the pool's queue, as in /stats"},
            "backends": {"type": "array", "items": {"$ref": _REF + "Backend"}},
        },
    },
    "PoolList": {
        "type": "object",
        "required": ["items", "total"],
        "properties": {
            "items": {"type": "array", "items": {"$ref": _REF + "Pool"},
                      "description": "default first, then pools: in file order"},
            "total": {"type": "integer", "minimum": 1},
        },
    },
}

STATS_PROPERTIES: dict[str, Any] = {
    "pools": {
        "type": "array",
        "description": "every pool: name, strategy, backends and healthy backends",
        "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "strategy": {"type": "string"},
            "backends": {"type": "integer", "minimum": 0},
            "healthy": {"type": "integer", "minimum": 0}}},
    },
    "routes": {
        "type": "array",
        "description": "the routes in the order they are tried: their match conditions, "
                       "pool and rate-limit policy (null: not limited)",
        "items": {"type": "object", "properties": {
            "match": {"type": "object"}, "pool": {"type": "string"},
            "rate_limit": {"type": "string", "nullable": True},
            "strip_prefix": {"type": "boolean"}}},
    },
}
