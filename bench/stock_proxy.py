"""Twisted's stock reverse proxy, the baseline every other proxy is compared with.

``twisted.web.proxy.ReverseProxyResource`` served on a plain ``Site``: one new
HTTP/1.0 backend connection per request, whole bodies buffered. Nothing is tuned;
this is what a Twisted user gets out of the box.

Usage: python bench/stock_proxy.py --port 8000 --backend-port 9000
"""

from __future__ import annotations

import argparse


def main() -> None:
    """Parse the command line and serve the proxy until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--backend-host", default="127.0.0.1")
    parser.add_argument("--backend-port", type=int, required=True)
    args = parser.parse_args()

    from twisted.internet import reactor
    from twisted.web.proxy import ReverseProxyResource
    from twisted.web.server import Site

    resource = ReverseProxyResource(args.backend_host, args.backend_port, b"")
    reactor.listenTCP(args.port, Site(resource), backlog=1024, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
