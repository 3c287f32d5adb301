"""equalizer: an HTTP reverse proxy and load balancer on Twisted."""

__version__ = "0.1.0"
