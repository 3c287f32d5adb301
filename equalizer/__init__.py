"""equalizer: an HTTP reverse proxy and load balancer on Twisted."""
