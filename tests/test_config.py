"""Configuration loading and validation (SPEC 2, 3): defaults, each kind of mistake, overrides."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import attrs
import pytest
import yaml

from equalizer.config.checks import parse_duration, validate_backend_url, validate_weight
from equalizer.config.loader import ConfigError, apply_overrides, load_config, parse_config
from equalizer.config.model import BackendConfig, BucketPolicy, Config
from equalizer.config.rules import MAX_CAPACITY, MAX_REFILL_RATE, MIN_REFILL_RATE

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "equalizer.yml"


def problems(data: object) -> list[str]:
    """The problem lines parse_config reports for a document that must be refused."""
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return caught.value.problems


def from_yaml(text: str) -> object:
    """Parse YAML text the way a config file is parsed (so ``yes`` is a boolean)."""
    return yaml.safe_load(text)


def section(name: str, **values: object) -> dict[str, object]:
    """A document holding one section with the given keys."""
    return {name: values}


def override_problems(config: Config, **kwargs: object) -> list[str]:
    """The problem lines apply_overrides reports for overrides that must be refused."""
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as caught:
        apply_overrides(config, **kwargs)
    return caught.value.problems


# -- defaults and the shipped file ---------------------------------------------------------


@pytest.mark.parametrize("document", [None, {}])
def test_empty_document_is_defaults(document: object) -> None:
    """An empty YAML document yields the built-in defaults."""
    assert parse_config(document) == Config()


def test_empty_sections_are_defaults() -> None:
    """A section header with nothing under it (YAML null) keeps that section's defaults."""
    assert parse_config(from_yaml("proxy:\nlogging:\n  rotate:\n")) == Config()


def test_defaults_match_spec() -> None:
    """The built-in defaults are the values SPEC section 3 shows."""
    config = Config()
    assert config.proxy.listen == "tcp:8080"
    assert config.proxy.timeouts.shutdown == 30.0
    assert config.admin.listen == "tcp:8081:interface=127.0.0.1"
    assert config.health.expected_status == (200, 399)
    assert config.rate_limit.default == BucketPolicy(100, 10.0)
    assert config.logging.rotate.max_bytes == 10 * 1024 * 1024


def test_shipped_file_is_the_defaults_with_three_backends() -> None:
    """config/equalizer.yml parses cleanly and differs from the defaults only in its backends."""
    backends = tuple(BackendConfig(f"http://127.0.0.1:{port}") for port in (9001, 9002, 9003))
    expected = attrs.evolve(Config(), balancer=attrs.evolve(Config().balancer, backends=backends))
    assert load_config(str(SHIPPED)) == expected


def test_shipped_file_sets_every_key() -> None:
    """The shipped file spells out every key, so it documents the whole schema."""
    document = yaml.safe_load(SHIPPED.read_text())

    def keys(value: object, prefix: str = "") -> set[str]:
        if not attrs.has(type(value)):
            return {prefix}
        found: set[str] = set()
        for name in attrs.fields_dict(type(value)):
            found |= keys(getattr(value, name), f"{prefix}.{name}".lstrip("."))
        return found

    def written(value: object, prefix: str = "") -> set[str]:
        if not isinstance(value, dict) or not value:
            return {prefix}
        found: set[str] = set()
        for name, item in value.items():
            found |= written(item, f"{prefix}.{name}".lstrip("."))
        return found

    assert keys(Config()) <= written(document)


def test_default_path_used_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no path, config/equalizer.yml in the current directory is read."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "equalizer.yml").write_text("proxy: {retries: 7}\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(None).proxy.retries == 7


def test_builtin_defaults_without_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no path and no config/equalizer.yml, the built-in defaults apply."""
    monkeypatch.chdir(tmp_path)
    assert load_config(None) == Config()


# -- values that are accepted --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("250ms", 0.25), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5),
     (5, 5.0), (0.5, 0.5), (0, 0.0), ("10", 10.0)],
)  # fmt: skip
def test_durations(value: object, seconds: float) -> None:
    """Durations are seconds, or numbers with an ms, s, m or h unit, read as float seconds."""
    assert parse_duration(value) == seconds
    assert isinstance(parse_duration(value), float)


@pytest.mark.parametrize("value", ["5x", "s", "-1s", -1, True, None, "", float("nan"), [1]])
def test_bad_durations_raise_value_error(value: object) -> None:
    """parse_duration refuses what is not a non-negative duration with a ValueError."""
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [("10MiB", 10 * 2**20), ("512KiB", 512 * 1024), ("1GB", 10**9), ("2kb", 2000),
     ("1.5MiB", 3 * 2**19), (4096, 4096)],
)  # fmt: skip
def test_sizes(value: object, size: int) -> None:
    """Sizes are plain byte counts or numbers with KiB/MiB/GiB (1024) or KB/MB/GB (1000)."""
    config = parse_config(section("logging", rotate={"max_bytes": value}))
    assert config.logging.rotate.max_bytes == size


def test_whole_document_converted() -> None:
    """Every section's values are converted to their typed form."""
    config = parse_config(
        from_yaml(
            """
            proxy:
              listen: "unix:/tmp/equalizer.sock"
              timeouts: {connect: 250ms, response: 1m}
              trusted_proxies: [10.0.0.0/8, "::1"]
              max_header_bytes: 32KiB
            balancer:
              strategy: weighted_round_robin
              hash_key: "cookie:session"
              backends: [{url: "https://b.example/app", weight: 1000}]
            health: {expected_status: 204, interval: 0}
            rate_limit: {key: "header:X-Api-Key", default: null}
            """
        )
    )
    assert config.proxy.timeouts.connect == 0.25
    assert config.proxy.timeouts.response == 60.0
    assert config.proxy.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.proxy.max_header_bytes == 32768
    assert config.balancer.backends == (BackendConfig("https://b.example/app", 1000),)
    assert config.health.expected_status == (204, 204)
    assert config.health.interval == 0.0
    assert config.rate_limit.default is None


def test_partial_default_bucket_keeps_other_default() -> None:
    """A default bucket giving only capacity keeps the default refill rate."""
    config = parse_config(section("rate_limit", default={"capacity": 5}))
    assert config.rate_limit.default == BucketPolicy(5, 10.0)


@pytest.mark.parametrize(
    ("value", "expected"), [("200-399", (200, 399)), ("200", (200, 200)), (204, (204, 204))]
)
def test_expected_status_forms(value: object, expected: tuple[int, int]) -> None:
    """expected_status takes a status, a quoted status or a range."""
    assert parse_config(section("health", expected_status=value)).health.expected_status == expected


@pytest.mark.parametrize("endpoint", ["tcp:0", "tcp6:8080", "tcp:port=80", "unix:/tmp/s"])
def test_good_endpoints(endpoint: str) -> None:
    """Endpoint strings Twisted understands are accepted unchanged, without listening."""
    assert parse_config(section("proxy", listen=endpoint)).proxy.listen == endpoint


def test_validate_backend_url_returns_url() -> None:
    """validate_backend_url returns a good URL as it was written."""
    assert validate_backend_url("http://[::1]:8000/prefix") == "http://[::1]:8000/prefix"


def test_postgres_store_accepted_by_parse_config() -> None:
    """A postgres store without a URL is not an error before overrides, which may supply it."""
    assert parse_config(section("rate_limit", store="postgres")).rate_limit.store == "postgres"


# -- one test per kind of mistake ---------------------------------------------------------


def test_unknown_top_level_key() -> None:
    """An unknown section is reported with the sections that exist."""
    assert problems({"proxies": {}}) == ["proxies: unknown key; did you mean 'proxy'?"]


def test_unknown_nested_key() -> None:
    """An unknown key deep in the document is reported at its full path."""
    assert problems(section("proxy", timeouts={"conect": "1s"})) == [
        "proxy.timeouts.conect: unknown key; did you mean 'connect'?"
    ]


def test_unknown_key_without_close_match_lists_keys() -> None:
    """An unknown key that resembles nothing lists the allowed keys."""
    assert problems(section("rate_limit", default={"burst": 3})) == [
        "rate_limit.default.burst: unknown key; expected one of: capacity, refill_rate"
    ]


def test_unknown_key_in_backend() -> None:
    """An unknown key inside a backend entry names the entry's index."""
    document = section("balancer", backends=[{"url": "http://a", "wieght": 2}])
    assert problems(document) == [
        "balancer.backends[0].wieght: unknown key; did you mean 'weight'?"
    ]


def test_yes_is_not_an_integer() -> None:
    """YAML ``yes`` is a boolean, and a boolean is not an integer."""
    assert problems(from_yaml("proxy: {retries: yes}")) == [
        "proxy.retries: expected an integer, got a boolean (true)"
    ]


def test_string_is_not_a_boolean() -> None:
    """A quoted "yes" is a string, not a boolean."""
    assert problems(section("logging", access_log="yes")) == [
        "logging.access_log: expected true or false, got a string ('yes')"
    ]


def test_number_is_not_a_string() -> None:
    """A bare port is not an endpoint string."""
    assert problems(section("proxy", listen=8080)) == [
        "proxy.listen: expected a string, got a number (8080)"
    ]


def test_section_must_be_mapping() -> None:
    """A section that is not a mapping is reported at the section."""
    assert problems({"health": [1]}) == ["health: expected a mapping, got a list"]


def test_top_level_must_be_mapping() -> None:
    """A document that is not a mapping is one problem about the whole config."""
    assert problems(["proxy"]) == ["config: expected a mapping, got a list"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://x", "not an http(s) URL: 'ftp://x'"),
        ("127.0.0.1:9001",
         "not an http(s) URL: '127.0.0.1:9001' (did you mean 'http://127.0.0.1:9001'?)"),
        ("backend.internal/app",
         "not an http(s) URL: 'backend.internal/app' (did you mean 'http://backend.internal/app'?)"),
        ("app:8080", "not an http(s) URL: 'app:8080' (did you mean 'http://app:8080'?)"),
        ("[::1]:80", "not an http(s) URL: '[::1]:80' (did you mean 'http://[::1]:80'?)"),
        ("x", "not an http(s) URL: 'x'"),
        ("http://", "not an http(s) URL: 'http://'"),
        ("http://a b", "not an http(s) URL: 'http://a b'"),
        ("http://x:99999", "invalid port in URL: 'http://x:99999'"),
        ("http://x:0", "invalid port in URL: 'http://x:0'"),
        ("http://x:port", "invalid port in URL: 'http://x:port'"),
        ("http://x/?a=1", "a backend URL cannot have a query or fragment: 'http://x/?a=1'"),
    ],
)
def test_bad_backend_url(url: str, message: str) -> None:
    """A backend URL that is not an http(s) URL with a host and a valid port is refused."""
    document = section("balancer", backends=[{"url": "http://ok"}, {"url": url}])
    assert problems(document) == [f"balancer.backends[1].url: {message}"]


def test_backend_url_required() -> None:
    """A backend entry without a url is refused."""
    assert problems(section("balancer", backends=[{"weight": 2}])) == [
        "balancer.backends[0].url: required"
    ]


def test_bad_duration() -> None:
    """A duration with an unknown unit names its key and the accepted forms."""
    assert problems(section("health", interval="5x")) == [
        "health.interval: not a duration: '5x' (use seconds, or a number with ms, s, m or h: "
        "250ms, 5s, 2m)"
    ]


def test_negative_duration() -> None:
    """A negative duration is refused."""
    assert problems(section("proxy", timeouts={"idle": -1})) == [
        "proxy.timeouts.idle: must be a number from 0 up, got -1"
    ]


def test_zero_timeout() -> None:
    """A connect timeout of zero would fail every request, so it is refused."""
    assert problems(section("proxy", timeouts={"connect": 0})) == [
        "proxy.timeouts.connect: must be more than 0 seconds"
    ]


def test_bad_size() -> None:
    """A size with an unknown unit is refused."""
    assert problems(section("logging", rotate={"max_bytes": "10XB"})) == [
        "logging.rotate.max_bytes: not a size: '10XB' (use bytes, or a number with KiB, MiB, "
        "GiB, KB, MB or GB: 512KiB, 10MiB)"
    ]


def test_max_header_bytes_minimum() -> None:
    """max_header_bytes below 1024 is refused."""
    assert problems(section("proxy", max_header_bytes=1000)) == [
        "proxy.max_header_bytes: must be at least 1024, got 1000"
    ]


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("foo:80", "invalid endpoint 'foo:80': Unknown endpoint type: 'foo'"),
        ("18080", "invalid endpoint '18080': Unknown endpoint type: '18080' "
                  "(did you mean 'tcp:18080'?)"),
        (":18080", "invalid endpoint ':18080': Unknown endpoint type: '' "
                   "(did you mean 'tcp:18080'?)"),
        ("127.0.0.1:8080", "invalid endpoint '127.0.0.1:8080': Unknown endpoint type: "
                           "'127.0.0.1' (did you mean 'tcp:8080:interface=127.0.0.1'?)"),
        ("localhost:8080", "invalid endpoint 'localhost:8080': Unknown endpoint type: "
                           "'localhost' (did you mean 'tcp:8080:interface=127.0.0.1'?)"),
        ("[::1]:8080", "invalid endpoint '[::1]:8080': Unknown endpoint type: '[' "
                       "(did you mean 'tcp6:8080:interface=\\:\\:1'?)"),
        ("tcp:http", "invalid endpoint 'tcp:http': port must be 0-65535; got 'http'"),
        ("tcp:70000", "invalid endpoint 'tcp:70000': port must be 0-65535; got '70000'"),
        ("tcp6:", "invalid endpoint 'tcp6:': port must be 0-65535; got ''"),
        (
            "tcp:80:iface=lo",
            "invalid endpoint 'tcp:80:iface=lo': got an unexpected keyword argument 'iface' "
            "(escape ':' in values as '\\:')",
        ),
    ],
)
def test_bad_endpoint(endpoint: str, message: str) -> None:
    """An endpoint string Twisted would refuse is reported with the reason."""
    assert problems(section("admin", listen=endpoint)) == [f"admin.listen: {message}"]


def test_ssl_endpoint_missing_certificate(tmp_path: Path) -> None:
    """An ssl: endpoint whose key file is missing is reported at start-up."""
    key = tmp_path / "missing.pem"
    endpoint = f"ssl:443:privateKey={key}"
    assert problems(section("proxy", listen=endpoint)) == [
        f"proxy.listen: invalid endpoint {endpoint!r}: cannot read {str(key)!r}: "
        "No such file or directory"
    ]


def test_unknown_strategy() -> None:
    """A strategy outside the list is refused, and the list is shown."""
    assert problems(section("balancer", strategy="fastest")) == [
        "balancer.strategy: must be one of round_robin, weighted_round_robin, "
        "least_connections, random, power_of_two, hash; got 'fastest'"
    ]


@pytest.mark.parametrize("key", ["cookie", "header:", "header:a b", "body:x", "ip:1"])
def test_bad_hash_key(key: str) -> None:
    """hash_key must be ip, header:NAME or cookie:NAME with a token NAME."""
    assert problems(section("balancer", hash_key=key)) == [
        f"balancer.hash_key: expected ip or header:NAME or cookie:NAME; got {key!r}"
    ]


def test_bad_rate_limit_key() -> None:
    """A rate-limit key cannot be a cookie: only ip or header:NAME."""
    assert problems(section("rate_limit", key="cookie:sid")) == [
        "rate_limit.key: expected ip or header:NAME; got 'cookie:sid'"
    ]


@pytest.mark.parametrize("weight", [0, 1001])
def test_weight_out_of_range(weight: int) -> None:
    """A backend weight outside 1..1000 is refused."""
    document = section("balancer", backends=[{"url": "http://a", "weight": weight}])
    assert problems(document) == [
        f"balancer.backends[0].weight: must be between 1 and 1000, got {weight}"
    ]


def test_validate_weight_refuses_boolean() -> None:
    """validate_weight, shared with the admin API, refuses a boolean."""
    with pytest.raises(ValueError, match="expected an integer"):
        validate_weight(True)


@pytest.mark.parametrize("key", ["unhealthy_threshold", "healthy_threshold"])
def test_threshold_minimum(key: str) -> None:
    """A health threshold below 1 is refused."""
    assert problems(section("health", **{key: 0})) == [f"health.{key}: must be at least 1, got 0"]


def test_negative_retries() -> None:
    """Negative retries are refused."""
    assert problems(section("proxy", retries=-1)) == ["proxy.retries: must be at least 0, got -1"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2xx", "expected a status or range like '200-399'; got a string ('2xx')"),
        ("399-200", "expected a range of statuses within 100-599; got '399-200'"),
        (600, "expected a range of statuses within 100-599; got 600"),
        (True, "expected a status or range like '200-399'; got a boolean (true)"),
    ],
)
def test_bad_expected_status(value: object, message: str) -> None:
    """expected_status must be a status or a low-high range within 100-599."""
    assert problems(section("health", expected_status=value)) == [
        f"health.expected_status: {message}"
    ]


def test_health_path_must_be_absolute() -> None:
    """A health-check path must start with a slash."""
    assert problems(section("health", path="health")) == [
        "health.path: must start with '/'; got 'health'"
    ]


def test_bad_trusted_proxy() -> None:
    """An invalid CIDR is reported at its index in the list."""
    document = section("proxy", trusted_proxies=["10.0.0.0/8", "10.0.0.0/33"])
    assert problems(document) == [
        "proxy.trusted_proxies[1]: not an IP network in CIDR notation: "
        "'10.0.0.0/33' does not appear to be an IPv4 or IPv6 network"
    ]


def test_trusted_proxy_with_host_bits() -> None:
    """A CIDR with host bits set is refused rather than silently widened or narrowed."""
    assert problems(section("proxy", trusted_proxies=["10.1.2.3/8"])) == [
        "proxy.trusted_proxies[0]: not an IP network in CIDR notation: 10.1.2.3/8 has host bits set"
    ]


@pytest.mark.parametrize(
    ("section_name", "key", "allowed"),
    [
        ("logging", "level", "debug, info, warn, error"),
        ("logging", "format", "text, json"),
        ("rate_limit", "headers", "both, draft, legacy, none"),
        ("rate_limit", "store", "memory, postgres"),
        ("rate_limit", "on_store_error", "allow, deny"),
    ],
)
def test_bad_choice(section_name: str, key: str, allowed: str) -> None:
    """A value outside a key's fixed choices is refused, and the choices are listed."""
    assert problems(section(section_name, **{key: "other"})) == [
        f"{section_name}.{key}: must be one of {allowed}; got 'other'"
    ]


def test_empty_backends() -> None:
    """An empty backend list is refused."""
    assert problems(section("balancer", backends=[])) == [
        "balancer.backends: at least one backend is required"
    ]


def test_duplicate_backends() -> None:
    """Two URLs naming the same server (case, default port, trailing slash aside) are refused."""
    document = section(
        "balancer", backends=[{"url": "http://a"}, {"url": "http://b"}, {"url": "HTTP://A:80/"}]
    )
    assert problems(document) == [
        "balancer.backends[2].url: duplicate backend URL 'HTTP://A:80/' (same as [0])"
    ]


def test_bad_default_bucket() -> None:
    """The default bucket needs capacity at least 1 and refill_rate at least 0."""
    assert problems(section("rate_limit", default={"capacity": 0, "refill_rate": -1})) == [
        "rate_limit.default.capacity: must be between 1 and 2147483647, got 0",
        "rate_limit.default.refill_rate: must be 0 or from 0.000001 to 1000000000 tokens a "
        "second, got -1",
    ]


@pytest.mark.parametrize(
    ("default", "key"),
    [
        ({"capacity": 2**31, "refill_rate": 1}, "capacity"),
        ({"capacity": 10**400, "refill_rate": 1}, "capacity"),
        ({"capacity": 10, "refill_rate": 1e308}, "refill_rate"),
        ({"capacity": 10, "refill_rate": 5e-324}, "refill_rate"),
        ({"capacity": 10, "refill_rate": 1e-7}, "refill_rate"),
        ({"capacity": 10, "refill_rate": 10**400}, "refill_rate"),
        ({"capacity": 10, "refill_rate": float("nan")}, "refill_rate"),
    ],
)
def test_default_bucket_outside_the_computable_bounds(default: dict, key: str) -> None:
    """A default bucket no store could refill without overflow or underflow is refused."""
    (problem,) = problems(section("rate_limit", default=default))
    assert problem.startswith(f"rate_limit.default.{key}: must be ")


@pytest.mark.parametrize("rate", [0, MIN_REFILL_RATE, 1, 1e9, MAX_REFILL_RATE])
def test_default_bucket_bounds_are_inclusive(rate: float) -> None:
    """Refill rates of 0 and from the minimum to the maximum, and capacity 2^31 - 1, are fine."""
    config = parse_config(section("rate_limit", default={"capacity": MAX_CAPACITY,
                                                         "refill_rate": rate}))
    assert config.rate_limit.default == BucketPolicy(MAX_CAPACITY, rate)


def test_empty_token() -> None:
    """An empty admin token is refused rather than read as "no authentication"."""
    assert problems(section("admin", token="")) == ["admin.token: must not be empty"]


def test_all_problems_reported_at_once() -> None:
    """Every problem in the document is reported, in document order, not just the first."""
    document = from_yaml(
        """
        proxy: {retries: yes, listen: "foo:1"}
        balancer:
          strategy: fastest
          backends: [{url: "ftp://x"}, {url: "http://a", weight: 0}, {url: "http://a"}]
        logging: {level: loud}
        extra: 1
        """
    )
    assert problems(document) == [
        "proxy.retries: expected an integer, got a boolean (true)",
        "proxy.listen: invalid endpoint 'foo:1': Unknown endpoint type: 'foo'",
        "balancer.strategy: must be one of round_robin, weighted_round_robin, "
        "least_connections, random, power_of_two, hash; got 'fastest'",
        "balancer.backends[0].url: not an http(s) URL: 'ftp://x'",
        "balancer.backends[1].weight: must be between 1 and 1000, got 0",
        "logging.level: must be one of debug, info, warn, error; got 'loud'",
        "extra: unknown key; expected one of: proxy, admin, balancer, health, rate_limit, logging",
    ]


def test_config_error_str_is_one_line_per_problem() -> None:
    """str(ConfigError) puts one problem on each line, ready for stderr."""
    assert str(ConfigError(["a: x", "b: y"])) == "a: x\nb: y"


# -- reading files ------------------------------------------------------------------------


def test_missing_file() -> None:
    """A config file that does not exist is one line naming it."""
    with pytest.raises(ConfigError) as caught:
        load_config("no-such-file.yml")
    assert caught.value.problems == [
        "config: cannot read 'no-such-file.yml': No such file or directory"
    ]


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    """A YAML syntax error is reported with its 1-based line and column, and the file's
    line there (and the one before it) with a caret under the column."""
    path = tmp_path / "bad.yml"
    path.write_text("proxy:\n  listen: tcp:8080\n    retries: 2\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert caught.value.problems == [
        f"config: YAML syntax error in {str(path)!r} at line 3, column 12: "
        "mapping values are not allowed here\n"
        "  2 |   listen: tcp:8080\n"
        "  3 |     retries: 2\n"
        "    |            ^"
    ]


@pytest.mark.parametrize(
    ("text", "excerpt"),
    [
        ('proxy: {listen: "tcp:80\n',
         ['  1 | proxy: {listen: "tcp:80', "    |                        ^"]),
        ("a: [1, 2\nb: 3\n", ["  1 | a: [1, 2", "  2 | b: 3", "    |  ^"]),
        ("\n" * 9 + "a: b: c\n", ["   9 | ", "  10 | a: b: c", "     |     ^"]),
    ],
)
def test_yaml_syntax_error_shows_the_lines(tmp_path: Path, text: str, excerpt: list[str]) -> None:
    """At the end of the file, the last line is shown; line numbers are aligned."""
    path = tmp_path / "bad.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    (problem,) = caught.value.problems
    assert problem.splitlines()[1:] == excerpt


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("proxy:\n  retries: 1\n  retries: 2\n", "proxy.retries: duplicate key in {path} at "
         "line 3, column 3"),
        ("balancer: {}\nbalancer: {}\n", "balancer: duplicate key in {path} at line 2, column 1"),
        ("proxy:\n  timeouts:\n    connect: 1s\n    connect: 2s\n",
         "proxy.timeouts.connect: duplicate key in {path} at line 4, column 5"),
        ("balancer:\n  backends:\n    - url: http://a\n      url: http://b\n",
         "balancer.backends[0].url: duplicate key in {path} at line 4, column 7"),
    ],
)
def test_duplicate_yaml_key(tmp_path: Path, text: str, where: str) -> None:
    """A key written twice in one mapping is refused, named by its key path, instead of the
    last one silently winning."""
    path = tmp_path / "dup.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert caught.value.problems == [where.format(path=repr(str(path)))]


def test_duplicate_key_under_an_alias(tmp_path: Path) -> None:
    """A document with aliases (even one that refers to itself) still names the duplicate."""
    path = tmp_path / "alias.yml"
    path.write_text("x: &a [*a]\nproxy: {retries: 1, retries: 2}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert caught.value.problems == [
        f"proxy.retries: duplicate key in {str(path)!r} at line 2, column 21"]


def test_file_problems_use_key_paths(tmp_path: Path) -> None:
    """A file that parses but is invalid reports key paths, as parse_config does."""
    path = tmp_path / "bad.yml"
    path.write_text("health: {healthy_threshold: 0}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert caught.value.problems == ["health.healthy_threshold: must be at least 1, got 0"]


def test_non_mapping_file(tmp_path: Path) -> None:
    """A file whose top level is not a mapping is refused."""
    path = tmp_path / "list.yml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert caught.value.problems == ["config: expected a mapping, got a list"]


# -- overrides ----------------------------------------------------------------------------

FILE = parse_config(
    from_yaml(
        """
        proxy: {listen: "tcp:1111"}
        admin: {listen: "tcp:2222", token: file-token}
        balancer: {backends: [{url: "http://file:1", weight: 5}]}
        rate_limit: {store: postgres, database_url: "dbname=file"}
        """
    )
)


def test_no_overrides_keep_file() -> None:
    """With no flags and no environment, the file's values stand."""
    assert apply_overrides(FILE, env={}) == FILE


def test_defaults_without_file_or_overrides() -> None:
    """With no file, flags or environment, the built-in defaults stand."""
    assert apply_overrides(Config(), env={}) == Config()


def test_listen_flag_beats_file() -> None:
    """--listen replaces proxy.listen."""
    assert apply_overrides(FILE, listen="tcp:3333", env={}).proxy.listen == "tcp:3333"


def test_admin_flag_beats_file() -> None:
    """--admin replaces admin.listen."""
    assert apply_overrides(FILE, admin="tcp:4444", env={}).admin.listen == "tcp:4444"


def test_backend_flags_replace_list() -> None:
    """Repeated --backend flags replace the configured backends, each with weight 1."""
    config = apply_overrides(FILE, backends=["http://x:1", "http://y:2"], env={})
    assert config.balancer.backends == (BackendConfig("http://x:1"), BackendConfig("http://y:2"))


def test_token_env_beats_file() -> None:
    """EQUALIZER_ADMIN_TOKEN replaces admin.token; without it the file's token stands."""
    assert apply_overrides(FILE, env={"EQUALIZER_ADMIN_TOKEN": "env"}).admin.token == "env"
    assert apply_overrides(FILE, env={}).admin.token == "file-token"


def test_token_env_beats_default() -> None:
    """EQUALIZER_ADMIN_TOKEN sets a token where the file sets none."""
    assert apply_overrides(Config(), env={"EQUALIZER_ADMIN_TOKEN": "env"}).admin.token == "env"


def test_empty_env_counts_as_unset() -> None:
    """An empty environment variable does not wipe the file's value."""
    env = {"EQUALIZER_ADMIN_TOKEN": "", "EQUALIZER_DATABASE_URL": ""}
    config = apply_overrides(FILE, env=env)
    assert (config.admin.token, config.rate_limit.database_url) == ("file-token", "dbname=file")


def test_database_url_precedence() -> None:
    """The database URL comes from the flag, else the environment, else the file."""
    env = {"EQUALIZER_DATABASE_URL": "dbname=env"}
    assert apply_overrides(FILE, database_url="dbname=flag", env=env).rate_limit.database_url == (
        "dbname=flag"
    )
    assert apply_overrides(FILE, env=env).rate_limit.database_url == "dbname=env"
    assert apply_overrides(FILE, env={}).rate_limit.database_url == "dbname=file"


def test_postgres_requires_database_url() -> None:
    """A postgres store with no database URL from file, environment or flag is refused."""
    config = parse_config(section("rate_limit", store="postgres"))
    assert override_problems(config) == [
        "rate_limit.database_url: required when rate_limit.store is postgres "
        "(or set EQUALIZER_DATABASE_URL)"
    ]


@pytest.mark.parametrize(
    "overrides",
    [{"env": {"EQUALIZER_DATABASE_URL": "dbname=env"}}, {"database_url": "dbname=flag", "env": {}}],
)
def test_postgres_database_url_from_override(overrides: dict[str, object]) -> None:
    """The environment or the flag can supply the URL a postgres store needs."""
    config = parse_config(section("rate_limit", store="postgres"))
    assert apply_overrides(config, **overrides).rate_limit.database_url is not None


def test_bad_overrides_name_their_flags() -> None:
    """Invalid flag values are all reported, each naming its flag."""
    assert override_problems(
        Config(),
        listen="tcp:http",
        admin="nope:1",
        backends=["x", "http://a", "http://a/"],
        database_url="",
    ) == [
        "--listen: invalid endpoint 'tcp:http': port must be 0-65535; got 'http'",
        "--admin: invalid endpoint 'nope:1': Unknown endpoint type: 'nope'",
        "--backend: not an http(s) URL: 'x'",
        "--backend: duplicate backend URL 'http://a/'",
        "--database-url: must not be empty",
    ]


# -- database URLs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dsn",
    ["dbname=test", "host=127.0.0.1 port=5432 user=postgres password='a b'",
     "postgresql://u:secret@db.example:5432/eq?sslmode=require", "postgres://h1:5432,h2:5433/eq"],
)
def test_valid_database_urls(dsn: str) -> None:
    """libpq key=value DSNs and postgresql:// URIs, multi-host ones included, are accepted."""
    config = parse_config(section("rate_limit", store="postgres", database_url=dsn))
    assert config.rate_limit.database_url == dsn


@pytest.mark.parametrize(
    ("dsn", "reason"),
    [
        ("http://x", 'missing "=" after "http://x" in connection info string'),
        ("host=x bogus=1", 'invalid connection option "bogus"'),
        ("postgresql://h/db?bogus=1", 'invalid URI query parameter: "bogus"'),
        ("host=x port=abc", "invalid port 'abc'"),
        ("postgresql://u:secret@h:99999/db", "invalid port '99999'"),
    ],
)
def test_malformed_database_url_is_a_config_error(dsn: str, reason: str) -> None:
    """A DSN libpq cannot parse is refused at start-up, without connecting, with libpq's reason."""
    assert problems(section("rate_limit", store="postgres", database_url=dsn)) == [
        f"rate_limit.database_url: not a valid PostgreSQL DSN or URL: {reason}"]


@pytest.mark.parametrize(
    "dsn",
    ["postgresql://u:s3cret@[::1/db", "postgresql://u:s3%zz@h/db", "host=x password='s3cret",
     "postgresql://h/db?password=s3cret&bogus=1", "password=s3cret bogus=1"],
)
def test_database_url_problems_never_show_the_password(dsn: str) -> None:
    """Whatever is wrong with a DSN, the message about it does not contain its password."""
    (problem,) = problems(section("rate_limit", database_url=dsn))
    assert problem.startswith("rate_limit.database_url: not a valid PostgreSQL DSN or URL: ")
    assert "s3" not in problem


def test_database_url_flag_and_environment_are_checked() -> None:
    """A malformed --database-url or EQUALIZER_DATABASE_URL is reported under its own name."""
    assert override_problems(Config(), database_url="http://x") == [
        "--database-url: not a valid PostgreSQL DSN or URL: "
        'missing "=" after "http://x" in connection info string']
    assert override_problems(Config(), env={"EQUALIZER_DATABASE_URL": "http://x"}) == [
        "EQUALIZER_DATABASE_URL: not a valid PostgreSQL DSN or URL: "
        'missing "=" after "http://x" in connection info string']


def test_max_buckets_defaults_to_a_million_and_is_bounded() -> None:
    """rate_limit.max_buckets is 1,000,000 unless set; it must be an integer from 1 to 10^9."""
    assert parse_config({}).rate_limit.max_buckets == 1_000_000
    assert parse_config(section("rate_limit", max_buckets=5)).rate_limit.max_buckets == 5
    assert problems(section("rate_limit", max_buckets=0)) == [
        "rate_limit.max_buckets: must be between 1 and 1000000000, got 0"]
    assert problems(section("rate_limit", max_buckets=10**10)) == [
        "rate_limit.max_buckets: must be between 1 and 1000000000, got 10000000000"]
    assert problems(section("rate_limit", max_buckets=True)) == [
        "rate_limit.max_buckets: expected an integer, got a boolean (true)"]
