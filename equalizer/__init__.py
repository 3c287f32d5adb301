"""equalizer: an HTTP reverse proxy and load balancer on Twisted."""

__version__ = "0.1.0"
"""The one place the version is written; pyproject.toml reads it from here."""
