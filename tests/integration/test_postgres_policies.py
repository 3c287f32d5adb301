"""The PostgreSQL schema of policies (SPEC 8, migration 0005): buckets stored before it
keep working under the ``default`` policy, and the same client id has one bucket per
policy."""

from __future__ import annotations

import pytest_twisted

from equalizer.buckets.postgres.migrations import migrations
from equalizer.config.model import BucketPolicy
from tests.integration.test_postgres_store import stores, within  # noqa: F401 (fixture)
from tests.postgres import sql


@pytest_twisted.ensureDeferred
async def test_buckets_stored_before_policies_survive_under_default(postgres_dsn, stores):
    """The schema as it was before policies, with rows (kept and from the default), then
    the store migrates: every row is there under ``default``, with its values, and takes
    and admin calls reach it as before."""
    await sql(postgres_dsn, "DROP TABLE IF EXISTS buckets, schema_migrations")
    await sql(postgres_dsn, "CREATE TABLE schema_migrations (version integer PRIMARY KEY, "
              "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT clock_timestamp())")
    before = [m for m in migrations() if m[0] < 5]
    assert [m[0] for m in before] == [1, 2, 3, 4]
    for version, name, script in before:
        await sql(postgres_dsn, script)
        await sql(postgres_dsn, "INSERT INTO schema_migrations VALUES (%s, %s)", (version, name))
    for client_id, capacity, tokens, from_default in [("alice", 10, 3, False),
                                                      ("10.0.0.7", 100, 40, True)]:
        await sql(postgres_dsn, "INSERT INTO buckets (client_id, capacity, tokens, refill_rate,"
                  " from_default) VALUES (%s, %s, %s, 0, %s)",
                  (client_id, capacity, tokens, from_default))

    store = await stores()
    rows = await sql(postgres_dsn, "SELECT policy, client_id, capacity, tokens, from_default "
                     "FROM buckets ORDER BY client_id", fetch=True)
    assert rows == [("default", "10.0.0.7", 100, 40.0, True), ("default", "alice", 10, 3.0, False)]
    records, total = await within(store.list(10, 0))
    assert total == 2 and {(r.policy, r.client_id) for r in records} == {
        ("default", "alice"), ("default", "10.0.0.7")}
    decision = await within(store.take("alice", BucketPolicy(50, 0)))
    assert (decision.allowed, decision.remaining) == (True, 2)
    assert (await within(store.take("alice", BucketPolicy(50, 0), "api"))).remaining == 49
    assert (await within(store.get("alice", "api"))).capacity == 50
    assert (await within(store.get("alice"))).tokens == 2.0
    assert (await within(store.list(10, 0, "api")))[1] == 1
    assert await within(store.delete("alice", "api"))
    assert (await within(store.get("alice"))) is not None
