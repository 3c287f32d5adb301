"""The lease sweep (equalizer.buckets.leases.sweep) on its own: expired allowances go back
in one statement, idle keys are forgotten, one sweep at a time, and nothing escapes."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from equalizer.buckets.leases.allowances import Allowances, Key
from equalizer.buckets.leases.settlement import Settlements
from equalizer.buckets.leases.sweep import SWEEP_CHUNK, Sweep
from equalizer.testing import FakeLeaseDatabase


@pytest.fixture
def parts(clock: Clock) -> tuple[Allowances, Sweep, FakeLeaseDatabase]:
    db = FakeLeaseDatabase(clock)
    allowances = Allowances(ttl=1.0, max_age=1.0, remember=0.5)
    settlements = Settlements(db, allowances, clock, 64, 2, 100, 1, 0, 0)
    settlements.running = True
    return allowances, Sweep(allowances, settlements, clock), db


def held(allowances: Allowances, client_id: str, allowance: int, expires: float) -> Key:
    key = allowances.keys[client_id] = Key()
    key.allowance, key.expires = allowance, expires
    return key


def test_expired_allowances_go_back_and_idle_keys_are_forgotten(parts, clock):
    allowances, sweep, db = parts
    now = clock.seconds()
    held(allowances, "live", 2, now + 1.0)
    held(allowances, "expired", 3, now + 0.2)
    waiting = held(allowances, "waiting", 0, now - 5)
    waiting.waiters.append(object())  # type: ignore[arg-type]
    settling = held(allowances, "settling", 0, now - 5)
    settling.settling = True
    remembered = held(allowances, "remembered", 0, now - 5)
    remembered.until = now + 10
    held(allowances, "idle", 0, now - 1.0)
    sweep.start()
    clock.advance(0.5)  # the first tick, every ttl / 2; then the give-back's statement
    assert db.settlements == [{"expired": (0, 0, 3, None)}]
    assert set(allowances.keys) == {"live", "expired", "waiting", "settling", "remembered"}
    clock.advance(1.0)
    assert "expired" not in allowances.keys  # idle for another ttl after its expiry
    sweep.stop()
    sweep.stop()  # twice is harmless


def test_tokens_kept_for_a_live_key_ride_along_until_it_goes_idle(parts, clock):
    """Tokens of a replaced allowance wait for the key's next settlement while its new
    allowance lives; once it expires (or there is none) the sweep sends them."""
    allowances, sweep, db = parts
    now = clock.seconds()
    live = held(allowances, "live", 2, now + 0.7)
    live.back = 1
    held(allowances, "spent", 0, now + 0.7).back = 4
    sweep.start()
    clock.advance(0.5)
    assert db.settlements == [{"spent": (0, 0, 4, None)}] and live.back == 1
    clock.advance(0.5)
    assert db.settlements[-1] == {"live": (0, 0, 3, None)} and live.back == 0
    sweep.stop()


def test_one_sweep_at_a_time_and_none_after_stop(parts, clock):
    allowances, sweep, _ = parts
    for i in range(SWEEP_CHUNK + 1):
        held(allowances, f"k{i}", 0, 0.0)
    allowances.cap_logged = True
    sweep.start()
    sweep.start()  # already sweeping: the same loop
    sweep.tick()
    assert len(sweep.sweeping) == 1 and not allowances.cap_logged
    left = sweep.sweeping
    sweep.tick()  # the last one is still under way
    assert sweep.sweeping is left
    sweep.stop()
    clock.advance(0)  # the next chunk finds the sweep stopped
    assert sweep.sweeping is None and len(allowances.keys) == 1
    assert not clock.getDelayedCalls()


def test_a_failing_sweep_is_logged_and_the_next_one_runs(parts, clock, monkeypatch):
    allowances, sweep, _ = parts
    held(allowances, "a", 0, 0.0)
    monkeypatch.setattr(sweep, "_look", lambda chunk, now: 1 / 0)
    sweep.start()
    clock.advance(0.5)
    assert sweep.sweeping is None
    monkeypatch.undo()
    clock.advance(0.5)
    assert allowances.keys == {}
    sweep.stop()


def test_a_key_forgotten_meanwhile_is_skipped(parts, clock):
    allowances, sweep, _ = parts
    for i in range(SWEEP_CHUNK + 1):
        held(allowances, f"k{i}", 0, 0.0)
    sweep.start()
    sweep.tick()
    allowances.keys.clear()
    clock.advance(0)
    assert sweep.sweeping is None
    sweep.stop()
