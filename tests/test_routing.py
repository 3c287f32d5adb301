"""The route table (equalizer.routing.table) and the configuration of pools, routes and
policies (equalizer.config.routes), without sockets."""

from __future__ import annotations

import pytest
from twisted.web.http_headers import Headers

from equalizer.config.loader import ConfigError, parse_config
from equalizer.config.model import RouteConfig
from equalizer.routing.table import RouteTable, bare_host


class Unit:
    def __init__(self, name: str) -> None:
        self.name = name


UNITS = {name: Unit(name) for name in ("default", "a", "b")}


def table(*routes: dict, policies: dict | None = None) -> RouteTable:
    config = parse_config({"balancer": {"backends": []}, "routes": list(routes),
                           "pools": {"a": {"backends": [{"url": "http://127.0.0.1:1"}]},
                                     "b": {"backends": [{"url": "http://127.0.0.1:2"}]}}})
    return RouteTable(config.routes, UNITS, policies or {"default": "P"})


def pick(routes: RouteTable, method: bytes = b"GET", host: bytes | None = b"x",
         path: bytes = b"/", **headers: str):
    found = routes.match(method, host, path,
                         Headers({name.replace("_", "-"): [value] for name, value in
                                  headers.items()}))
    return None if found is None else found.index


def test_bare_host_drops_the_port_and_the_case():
    assert bare_host(b"API.Example.com:8080") == b"api.example.com"
    assert bare_host(b"[::1]:80") == b"[::1]"
    assert bare_host(None) == b""


def test_conditions_and_order():
    routes = table({"match": {"host": "*.example.com", "methods": ["GET"]}, "pool": "a"},
                   {"match": {"path_prefix": "/v1/", "headers": {"X-A": "1"}}, "pool": "b"},
                   {"match": {"path_prefix": "/v1/"}, "pool": "a"})
    assert pick(routes, host=b"w.EXAMPLE.com:1") == 0
    assert pick(routes, b"POST", host=b"w.example.com", path=b"/v1/x") == 2
    assert pick(routes, path=b"/v1/x", X_A="1") == 1
    assert pick(routes, path=b"/v1/x", X_A="12") == 2
    assert pick(routes, path=b"/v2") is None


def test_two_hundred_routes_match_the_last():
    routes = table(*({"match": {"path_prefix": f"/r{i}/"}, "pool": "a"} for i in range(200)))
    assert pick(routes, path=b"/r199/x") == 199
    assert pick(routes, path=b"/r1/x") == 1
    assert pick(routes, path=b"/nothing") is None


def test_routes_resolve_pools_and_policies():
    routes = table({"pool": "b", "rate_limit": None}, policies={"default": "P"})
    route = routes.routes[0]
    assert (route.unit.name, route.policy) == ("b", None)
    assert table({"pool": "a"}).routes[0].policy == "P"


def test_rewrites_keep_other_fields():
    routes = table({"pool": "a", "request_headers": {"set": {"X-Env": "prod"},
                                                    "remove": ["X-Debug"]},
                    "response_headers": {"set": {"Cache-Control": "no-store"},
                                         "remove": ["Server"]}})
    route = routes.routes[0]
    lines = route.rewrite_request([b"X-Debug: 1\r\n", b"X-Env: dev\r\n", b"Accept: */*\r\n"])
    assert lines == [b"Accept: */*\r\n", b"X-Env: prod\r\n"]
    fields = route.rewrite_response([(b"Server", b"x"), (b"cache-control", b"max-age=1"),
                                     (b"ETag", b"1")])
    assert fields == [(b"ETag", b"1"), (b"Cache-Control", b"no-store")]


@pytest.mark.parametrize(("document", "problem"), [
    ({"routes": [{"pool": "nope"}]}, "routes[0].pool: unknown pool 'nope'; pools: default"),
    ({"routes": [{"rate_limit": "x"}]}, "routes[0].rate_limit: unknown policy 'x'"),
    ({"routes": [{"strip_prefix": True}]}, "routes[0].strip_prefix: needs match.path_prefix"),
    ({"routes": [{"match": {"host": "a.com:80"}}]}, "routes[0].match.host: expected a host"),
    ({"routes": [{"match": {"path_prefix": "v1"}}]}, "routes[0].match.path_prefix: must start"),
    ({"routes": [{"match": {"methods": ["get"]}}]}, "routes[0].match.methods[0]: expected an"),
    ({"routes": [{"request_headers": {"set": {"Host": "x"}}}]},
     "routes[0].request_headers.set.Host: Host is managed by the proxy"),
    ({"routes": [{"response_headers": {"set": {"X": "a\nb"}}}]},
     "routes[0].response_headers.set.X: a header value holds no control characters"),
    ({"routes": [{"mach": {}}]}, "routes[0].mach: unknown key; did you mean 'match'?"),
    ({"pools": {"default": {"backends": [{"url": "http://h"}]}}}, "pools.default: 'default'"),
    ({"pools": {"api": {"strategy": "random"}}}, "pools.api.backends: required"),
    ({"pools": {"api": {"backends": [{"url": "http://h"}], "health": {"pth": "/"}}}},
     "pools.api.health.pth: unknown key"),
    ({"pools": {"a b": {"backends": [{"url": "http://h"}]}}}, "pools.a b: expected a name"),
    ({"rate_limit": {"policies": {"api": {"key": "cookie:x"}}}},
     "rate_limit.policies.api.key: expected ip or header:NAME"),
    ({"balancer": {"backends": []}}, "balancer.backends: at least one backend is required"),
])
def test_config_errors_name_the_key_path(document, problem):
    with pytest.raises(ConfigError) as error:
        parse_config(document)
    assert any(line.startswith(problem) for line in error.value.problems), error.value.problems


def test_pools_inherit_health_and_policies_inherit_key_and_default():
    config = parse_config({
        "health": {"path": "/hz", "interval": "2s"},
        "rate_limit": {"key": "header:X-Key", "default": {"capacity": 5, "refill_rate": 1},
                       "policies": {"strict": {"default": {"capacity": 1}}, "same": None}},
        "pools": {"api": {"backends": [{"url": "http://h"}], "health": {"path": "/api/hz"}}}})
    health = config.pools[0].health
    assert (health.path, health.interval) == ("/api/hz", 2.0)
    policies = config.rate_limit.all_policies()
    assert list(policies) == ["default", "strict", "same"]
    assert (policies["strict"].key, policies["strict"].default.capacity,
            policies["strict"].default.refill_rate) == ("header:X-Key", 1, 1.0)
    assert policies["same"] == policies["default"]


def test_no_routes_is_the_configuration_as_before():
    config = parse_config({"balancer": {"backends": [{"url": "http://h"}]}})
    assert (config.pools, config.routes, config.rate_limit.policies) == ((), (), ())
    assert RouteConfig().rate_limit == "default"


def test_classes_are_kept_up_to_a_bound_and_match_the_same_past_it(monkeypatch):
    """Each class of request (method, host, watched header values) gets its path matcher
    once; past MAX_CLASSES a class is matched without being kept, with the same answer."""
    routes = table({"match": {"host": "*.a.com", "headers": {"X-A": "1"}}, "pool": "a"},
                   {"match": {"host": "b.com", "path_prefix": "/x"}, "pool": "b"},
                   {"match": {"methods": ["PUT"]}, "pool": "a"})
    cases = [((b"GET", b"w.a.com"), {"X_A": "1"}, 0), ((b"GET", b"a.com"), {"X_A": "1"}, None),
             ((b"GET", b"B.com:80"), {}, None), ((b"PUT", b"b.com"), {}, 2)]
    for (method, host), headers, wanted in cases:
        assert pick(routes, method, host, **headers) == wanted
    assert pick(routes, host=b"b.com", path=b"/xy") == 1
    assert len(routes._classes) == 4
    monkeypatch.setattr("equalizer.routing.table.MAX_CLASSES", 0)
    fresh = table({"match": {"host": "b.com", "path_prefix": "/x"}, "pool": "b"})
    assert pick(fresh, host=b"b.com", path=b"/x") == 0
    assert pick(fresh, host=b"c.com", path=b"/x") is None
    assert fresh._classes == {}
