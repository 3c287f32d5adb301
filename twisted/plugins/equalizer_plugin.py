"""twistd plugin: ``twistd equalizer`` builds its service from equalizer.service."""

from twisted.application.service import ServiceMaker

equalizer = ServiceMaker(
    "equalizer",
    "equalizer.service",
    "HTTP reverse proxy and load balancer",
    "equalizer",
)
