"""A worker process, ``python -m equalizer.workers PARENT_PID`` (the supervisor starts
it): the product's reactor first, as for ``twistd equalizer`` (:mod:`equalizer.tap`)."""

import sys

from equalizer.proxy.site import install_reactor

install_reactor()

from equalizer.workers.worker import main  # noqa: E402 (after the reactor)

main(sys.argv)
