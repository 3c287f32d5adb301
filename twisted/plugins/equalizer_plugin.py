"""twistd plugin: ``twistd equalizer`` builds its service through equalizer.tap."""

from twisted.application.service import ServiceMaker

equalizer = ServiceMaker(
    "equalizer",
    "equalizer.tap",
    "HTTP reverse proxy and load balancer",
    "equalizer",
)
