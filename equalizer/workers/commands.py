"""The control channel between the supervisor and each worker: Twisted AMP over a
socketpair that the worker inherits.

Supervisor to worker: backend state (:class:`SetBackends`), drains, reloads, stats
snapshots (:class:`Snapshot`). Worker to supervisor: token settlements
(:class:`Settle`) and log lines (:class:`Lines`). Bodies are JSON in
:class:`BigUnicode` arguments, split over as many AMP values (64 KiB each) as needed.
"""

from __future__ import annotations

import base64
import pickle
from typing import Any

from twisted.protocols import amp

from equalizer.buckets.interface import StoreUnavailable
from equalizer.config.model import Config

CHUNK = 60_000
"""Bytes per AMP value of a BigUnicode (AMP allows 65,535)."""


class BigUnicode(amp.Argument):
    """Text of any length, split over the keys ``name``, ``name.1``, ``name.2``..."""

    def toBox(self, name: bytes, strings: dict, objects: dict, proto: Any) -> None:
        data = objects[str(name, "ascii")].encode("utf-8")
        parts = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
        strings[name] = parts[0]
        for index, part in enumerate(parts[1:], 1):
            strings[name + b".%d" % index] = part

    def fromBox(self, name: bytes, strings: dict, objects: dict, proto: Any) -> None:
        parts = [strings[name]]
        index = 1
        while (key := name + b".%d" % index) in strings:
            parts.append(strings[key])
            index += 1
        objects[str(name, "ascii")] = b"".join(parts).decode("utf-8")


def encode_config(config: Config) -> str:
    """The configuration as the supervisor runs it, for a worker (its stdin at start, then
    :class:`Reload`): the parsed objects themselves, so that a worker never reads the file
    and cannot disagree with the supervisor. Pickle: both ends are this program."""
    return base64.b64encode(pickle.dumps(config)).decode("ascii")


def decode_config(text: str) -> Config:
    """What :func:`encode_config` made, sent by the supervisor (this worker's parent)."""
    return pickle.loads(base64.b64decode(text))


class SetBackends(amp.Command):
    """The supervisor's backends (JSON list, see ``supervisor.backend_state``)."""

    arguments = [(b"state", BigUnicode())]
    response: list = []


class Drain(amp.Command):
    """Stop sending new requests to a backend; answered once none is in flight."""

    arguments = [(b"backend_id", amp.Unicode())]
    response = [(b"cancelled", amp.Boolean())]


class Reload(amp.Command):
    """Apply the configuration the supervisor reloaded (SIGHUP reached it; ``config``, see
    :func:`encode_config`), then take the backends of every pool as the supervisor has them
    after that reload (``state``, as :class:`SetBackends`): one message, so a worker never
    routes to a pool it has not been given the backends of yet."""

    arguments = [(b"config", BigUnicode()), (b"state", BigUnicode())]
    response = [(b"ok", amp.Boolean())]


class Snapshot(amp.Command):
    """The worker's traffic figures (JSON, see ``aggregate.snapshot``)."""

    arguments: list = []
    response = [(b"figures", BigUnicode())]


class Settle(amp.Command):
    """One settlement of leased tokens (JSON rows as ``LeaseDatabase.settle`` takes and
    answers them); fails as the store does when it is unreachable."""

    arguments = [(b"batch", BigUnicode())]
    response = [(b"rows", BigUnicode())]
    errors = {StoreUnavailable: b"STORE_UNAVAILABLE"}


class Lines(amp.Command):
    """Whole log lines (access and error log), in the supervisor's format already."""

    arguments = [(b"text", BigUnicode())]
    response: list = []
