"""Schema migrations of the PostgreSQL bucket store, run when it starts.

``schema/NNNN_name.sql`` (package data), in version order, inside one transaction
that holds an advisory lock, so instances starting together neither race nor
half-apply; applied versions are recorded in ``schema_migrations``. CHECK
constraints in the schema enforce the bucket invariants of
:mod:`equalizer.config.rules` (capacity > 0, 0 <= tokens <= capacity, refill_rate
0 or within its bounds, so every refill can be computed).
"""

from __future__ import annotations

import re
from importlib.resources import files

from twisted.logger import Logger
from txpostgres.txpostgres import Cursor

from equalizer.buckets.postgres.sql import MIGRATION_LOCK

log = Logger()

_MIGRATION_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")

Migration = tuple[int, str, str]
"""``(version, name, sql)``."""


def migrations() -> list[Migration]:
    """``(version, name, sql)`` of every packaged migration, by version."""
    found = []
    for entry in files("equalizer.buckets.postgres").joinpath("schema").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    found.sort()
    return found


async def migrate(cursor: Cursor, scripts: list[Migration]) -> None:
    """Apply the ``scripts`` the database lacks, through ``cursor``.

    Runs in one transaction (``runInteraction``): all of it, or none of it. The
    advisory lock makes instances starting together take turns.
    """
    await cursor.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
    await cursor.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version integer PRIMARY KEY,"
        " name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )
    await cursor.execute("SELECT version FROM schema_migrations")
    applied = {row[0] for row in cursor.fetchall()}
    for version, name, sql in scripts:
        if version in applied:
            continue
        log.info("applying database migration {version:04d}_{name}", version=version, name=name)
        await cursor.execute(sql)
        await cursor.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name)
        )
    unknown = applied - {version for version, _, _ in scripts}
    if unknown:
        log.warn(
            "the database has schema versions {versions} this equalizer does not know",
            versions=sorted(unknown),
        )
