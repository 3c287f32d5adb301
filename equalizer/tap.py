"""``twistd equalizer``: the module of the twistd plugin (``twisted/plugins``).

The product's reactor (:func:`equalizer.proxy.site.install_reactor`) goes in before
anything imports Twisted's default one: importing the service does (klein, at import).
twistd loads this module when it parses the ``equalizer`` command's options, after its
own (``-r NAME`` has installed that reactor by then, and wins).
"""

from equalizer.proxy.site import install_reactor

install_reactor()

from equalizer.service import Options, makeService  # noqa: E402 (after the reactor)

__all__ = ["Options", "makeService"]
