"""A small asyncio reverse proxy on aiohttp, as a reference point for equalizer.

One pooled ``ClientSession`` (keep-alive connections to the backend, high
connection limit), bodies streamed in both directions, hop-by-hop headers dropped.
It is what a reasonably careful asyncio user would write in an afternoon.

Usage: python bench/aiohttp_proxy.py --port 8000 --backend http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse

from aiohttp import ClientSession, TCPConnector, web

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
CHUNK = 64 * 1024
SESSION = web.AppKey("session", ClientSession)


def forwardable(headers) -> dict[str, str]:
    """Headers minus the hop-by-hop ones (and those named in Connection)."""
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
    }
    drop = HOP_BY_HOP | named
    return {k: v for k, v in headers.items() if k.lower() not in drop}


def make_app(backend: str) -> web.Application:
    """Build the application that relays every request to ``backend``."""
    backend = backend.rstrip("/")

    async def relay(request: web.Request) -> web.StreamResponse:
        session = request.app[SESSION]
        headers = forwardable(request.headers)
        headers.pop("Host", None)
        body = request.content if request.body_exists else None
        async with session.request(
            request.method,
            backend + request.rel_url.raw_path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=forwardable(upstream.headers),
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await response.write(chunk)
            await response.write_eof()
            return response

    async def session_context(app: web.Application):
        connector = TCPConnector(limit=1024, limit_per_host=0, keepalive_timeout=60)
        async with ClientSession(connector=connector, auto_decompress=False) as session:
            app[SESSION] = session
            yield

    app = web.Application()
    app.cleanup_ctx.append(session_context)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


def main() -> None:
    """Parse the command line and serve the proxy until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--backend", required=True, help="backend base URL")
    args = parser.parse_args()
    web.run_app(
        make_app(args.backend),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        backlog=1024,
    )


if __name__ == "__main__":
    main()
