"""What stands before the admin routes: a bounded request, the Origin and token checks,
and paths the routes could misread.

The guard refuses in a fixed order (cross-origin write 403, missing token 401,
oversized body 413, undecodable or dot-segment path 400) before any route runs,
so a refused request has changed nothing.
"""

from __future__ import annotations

import hmac
from urllib.parse import unquote_to_bytes, urlsplit

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from equalizer.admin.errors import ApiError, bad_request, error_response
from equalizer.proxy.site import HeadRefusingChannel

MAX_BODY_BYTES = 65536
"""Admin request bodies are small JSON objects; anything larger is refused unread."""

MAX_HEAD_BYTES = 16384
"""Longest admin request line, header line and whole request head; past it 414 or 431."""

SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})
"""Methods that change nothing, so a cross-origin browser may send them."""

DEFAULT_PORTS = {"http": 80, "https": 443}

OPEN_PATHS = frozenset({b"/health", b"/dashboard"})
"""Paths GET and HEAD reach without the token: the health check, and the dashboard page
(static HTML that holds no data; its script sends the token on every data call)."""


def admin_site(routes: Resource, token: str | None) -> Site:
    """The admin site: bearer-token guard, bounded bodies, then ``routes``."""
    site = QuietSite(Guard(routes, token))
    site.requestFactory = BoundedRequest
    site.noisy = False
    return site


class AdminChannel(HeadRefusingChannel):
    """The admin port's HTTP/1.1 channel: an oversized or malformed request head gets
    414, 431 or 400 in the API's JSON error shape, as on the proxy port, within a fixed
    ``MAX_HEAD_BYTES``."""

    MAX_LENGTH = MAX_HEAD_BYTES
    totalHeadersSize = MAX_HEAD_BYTES


class QuietSite(Site):
    """Admin calls are not proxied traffic: they stay out of the access log.

    HTTP/1.1 only, on ``AdminChannel`` (not twisted.web's HTTP/2-capable wrapper)."""

    protocol = AdminChannel

    def log(self, request: Request) -> None:
        pass


class BoundedRequest(Request):
    """An admin request whose body is dropped, not stored, past MAX_BODY_BYTES.

    twisted.web reads the whole body before routing; this keeps that read
    bounded in memory, and the guard answers 413 for such a request.
    """

    too_large = False
    received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY_BYTES:
            self.too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > MAX_BODY_BYTES:
            self.too_large = True
        if not self.too_large:
            super().handleContentChunk(data)


class Guard(Resource):
    """Checks the origin, the bearer token, the body size and the path before any route runs."""

    isLeaf = True

    def __init__(self, inner: Resource, token: str | None) -> None:
        super().__init__()
        self._inner = inner
        self._token = token

    def render(self, request: BoundedRequest) -> bytes | int:
        refusal = self.refusal(request)
        if refusal is not None:
            return error_response(request, refusal)
        return self._inner.render(request)

    def refusal(self, request: BoundedRequest) -> ApiError | None:
        """Why ``request`` may not reach the routes, or None."""
        if request.method not in SAFE_METHODS and not same_origin(request):
            return ApiError(
                403, "forbidden_origin",
                "a browser page of another origin may not change this API (Origin header)")
        if not authorized(request, self._token):
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="equalizer"')
            return ApiError(
                401, "unauthorized", "a valid 'Authorization: Bearer TOKEN' header is required")
        if request.too_large:
            request.setHeader(b"Connection", b"close")
            return ApiError(413, "payload_too_large", f"request body over {MAX_BODY_BYTES} bytes")
        if not decodable_url(request):
            shown = request.path.decode("ascii", "backslashreplace")
            return bad_request(f"path: {shown[:200]!r} is not UTF-8 once percent-decoded")
        if has_dot_segment(request.path):
            return bad_request(
                "path: dot segments ('.' or '..', also percent-encoded) are not allowed")
        return None


def authorized(request: IRequest, token: str | None) -> bool:
    """Everything but GET and HEAD of ``OPEN_PATHS`` needs the bearer token, when one is set.

    The scheme is case-insensitive and may be followed by several spaces (RFC 7235
    section 2.1); the token is compared exactly, in constant time.
    """
    if token is None or (request.method in (b"GET", b"HEAD") and request.path in OPEN_PATHS):
        return True
    scheme, _, presented = (request.getHeader(b"authorization") or b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(
        presented.lstrip(b" "), token.encode("utf-8"))


def decodable_url(request: Request) -> bool:
    """Whether Klein can decode the path and host as UTF-8 (else it logs a critical error)."""
    try:
        b"/".join(request.postpath).decode("utf-8")
        request.getRequestHostname().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def has_dot_segment(path: bytes) -> bool:
    """Whether a segment of ``path`` is ``.`` or ``..``, percent-encoded or not.

    RFC 3986 5.2.4 would resolve them away (``/buckets/../stats`` is ``/stats``);
    routing would instead read them as part of an id (a bucket named ``../stats``).
    Neither is what the client meant to ask for, so such paths are refused.
    """
    return any(segment and unquote_to_bytes(segment) in (b".", b"..")
               for segment in path.split(b"/") if b"." in segment or b"%" in segment)


def same_origin(request: IRequest) -> bool:
    """No Origin header (not a browser, or same-origin), or every one names this API's own.

    Browsers send Origin on cross-origin requests; a page elsewhere must not change
    buckets or backends of an API that has no token by default (cross-site request
    forgery). The request's own origin is its scheme and its Host header.
    """
    origins = request.requestHeaders.getRawHeaders(b"origin")
    if not origins:
        return True
    host = request.getHeader(b"host")
    if host is None:
        return False
    scheme = "https" if request.isSecure() else "http"
    own = origin_tuple(f"{scheme}://{host.decode('latin-1')}")
    return own is not None and all(
        origin_tuple(origin.decode("latin-1")) == own for origin in origins)


def origin_tuple(text: str) -> tuple[str, str, int] | None:
    """``scheme://host[:port]`` as (scheme, host, port) to compare; None for anything else
    (``null``, a path, a bad port)."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.username is not None \
            or parts.path or parts.query or parts.fragment:
        return None
    return scheme, parts.hostname, port or DEFAULT_PORTS[scheme]
