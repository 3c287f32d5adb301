"""Which failed connections count against a backend, for the proxy and the health checks alike."""

from __future__ import annotations

import errno

from twisted.internet.error import ConnectError
from twisted.python.failure import Failure

LOCAL_RESOURCE_ERRNOS = frozenset({
    errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL,
})
"""Connect errors that are the proxy's own shortage (descriptors, buffers, memory, local
ports), not anything the backend did."""


def is_local_resource_error(reason: Failure) -> bool:
    """Whether a failed connect is the proxy's own shortage (EMFILE: no socket could even be
    created), which says nothing about the backend and must not count against it."""
    return reason.check(ConnectError) is not None and \
        getattr(reason.value, "osError", None) in LOCAL_RESOURCE_ERRNOS
