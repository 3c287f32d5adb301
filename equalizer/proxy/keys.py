"""The client key: what a request is counted by (rate limits) or hashed on (``hash``
balancing) — the client address, a header or a cookie."""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import TYPE_CHECKING

from equalizer.config.rules import MAX_CLIENT_ID_LENGTH, key_digest

if TYPE_CHECKING:
    from equalizer.proxy.exchange import Exchange


def key_reader(spec: str) -> Callable[[Exchange], str]:
    """How to read a client key (``ip``, ``header:NAME``, ``cookie:NAME``) off an exchange.

    A missing header or cookie falls back to the client address, so every
    request has a key and a client cannot escape a limit by leaving one out.
    """
    kind, _, name = spec.partition(":")
    if kind == "header":
        header = name.lower().encode("latin-1")

        def from_header(exchange: Exchange) -> str:
            # The fields' index, not getRawHeaders, and the usual value (not empty, not
            # too long, UTF-8) decoded here, the rest by _usable_key: on every limited
            # request, one Python call fewer.
            entry = exchange.request.requestHeaders.index.get(header)
            if entry is None:
                return exchange.client
            value = entry[1][0]
            if 0 < len(value) <= MAX_CLIENT_ID_LENGTH:
                try:
                    return value.decode("utf-8")
                except UnicodeDecodeError:
                    pass
            return _usable_key(value, exchange)

        return from_header
    if kind == "cookie":
        cookie = name.encode("latin-1")

        def from_cookie(exchange: Exchange) -> str:
            value = exchange.request.received_cookies.get(cookie)
            return _usable_key(value, exchange) if value is not None else exchange.client

        return from_cookie
    return _client_of


_client_of = attrgetter("client")
"""The client address of an exchange, read without a Python call (the default key)."""


def _usable_key(value: bytes, exchange: Exchange) -> str:
    """A header or cookie value as a bucket key: UTF-8 text (latin-1 if it is not), the
    client address when empty, the one digest of :mod:`equalizer.config.rules` when
    longer than a client id may be, so no value escapes the limit. (``from_header``
    decodes the usual value itself, as the first case here.)"""
    if not value:
        return exchange.client
    if len(value) > MAX_CLIENT_ID_LENGTH:
        return key_digest(value)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")
