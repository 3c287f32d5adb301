"""Backends and the choice among them: pool, strategies, health checks, traffic counts."""
