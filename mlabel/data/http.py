"""HTTP(S) reads of shards and their vocabulary: every request goes through :func:`open_url`.

A server is data, not code, so each request is bounded whatever the server does:

- only ``http://`` and ``https://``; a redirect is followed only to http(s) on the same host (an
  https URL never continues over plain http), at most :data:`MAX_REDIRECTS` times;
- an overall deadline: :data:`TIMEOUT` seconds plus the time the bytes received so far take at
  :data:`MIN_RATE` (a server that sends a byte now and then is cut off, however long each
  single read may wait); a watchdog shuts the socket when it passes;
- a cap: a response never delivers more than the caller expects (a range answered with a huge
  body is not read beyond the range);
- a failure is a :class:`FetchError` naming the URL, never a bare ``IncompleteRead``.

Retries and backoff belong here too, around :func:`open_url`.
"""
from __future__ import annotations

import email.utils
import http.client
import re
import socket
import ssl
import threading
import time
from urllib.parse import urljoin, urlsplit

from ..errors import DataError

__all__ = ["FetchError", "Response", "open_url", "fetch", "fetch_range", "probe", "is_url", "same_host"]

TIMEOUT = 60.0  # seconds to connect, to answer, and the slack of every deadline
MIN_RATE = 64 << 10  # bytes per second a response must average beyond its first TIMEOUT seconds
MAX_REDIRECTS = 5
CHUNK = 1 << 16  # bytes per read: the deadline moves on with every chunk
REDIRECTS = (301, 302, 303, 307, 308)


class FetchError(DataError):
    """A URL could not be read (network, server, deadline or size): not a problem of the data."""


def is_url(name) -> bool:
    return isinstance(name, str) and name.startswith(("http://", "https://"))


def same_host(a: str, b: str) -> bool:
    """Whether two URLs name the same server (scheme, host and port)."""
    a, b = urlsplit(a), urlsplit(b)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


class _Watchdog:
    """Shuts the socket once the request's deadline has passed: a read blocked in the kernel then
    returns, however slowly the server drips (a per-read timeout alone never fires for that)."""

    def __init__(self, sock: socket.socket, start: float):
        self.sock, self.start, self.received, self.expired = sock, start, 0, False
        self._done = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def deadline(self) -> float:
        return self.start + TIMEOUT + self.received / MIN_RATE

    def _watch(self) -> None:
        while not self._done.wait(max(0.0, self.deadline() - time.monotonic())):
            if time.monotonic() >= self.deadline():
                self.expired = True
                try:  # the plain socket's shutdown: an SSL socket's own would drop its state under the reader
                    socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
                except OSError:
                    pass
                return

    def stop(self) -> None:
        self._done.set()


class Response:
    """A response body as a file to ``read`` (what ``tarfile`` streams from), never more than
    ``limit`` bytes (after skipping ``skip``: a range a server answered with the whole file)."""

    def __init__(self, url: str, raw: http.client.HTTPResponse, conn, watchdog: _Watchdog, limit: int,
                 skip: int = 0):
        self.url, self.raw, self.conn, self.watchdog = url, raw, conn, watchdog
        self.status, self.headers = raw.status, raw.headers
        self.length = _int_header(raw, "Content-Length")  # as the server announced it
        self.left, self.got = limit, 0
        while skip > 0:
            skipped = self._chunk(min(CHUNK, skip))
            if not skipped:
                raise FetchError(f"cannot fetch {url}: the response ended before the range asked for")
            skip -= len(skipped)
        self.got = 0  # what the caller has read

    def _chunk(self, n: int) -> bytes:
        try:
            data = self.raw.read1(n)
        except (OSError, http.client.HTTPException, ValueError) as err:
            self._fail(err)
        if not data and n and self.length is not None and self.raw.length:
            self._fail(http.client.IncompleteRead(b"", self.raw.length))  # read1 returns b"" early
        if not data and n and self.watchdog.expired:
            self._fail(TimeoutError())
        self.watchdog.received += len(data)
        return data

    def _fail(self, err: BaseException):
        self.close()
        if self.watchdog.expired:
            raise FetchError(f"cannot fetch {self.url}: the server did not send it within its deadline "
                             f"({TIMEOUT:g} s plus {MIN_RATE:,} bytes a second): it is stalled or too slow") from None
        if isinstance(err, http.client.IncompleteRead):
            raise FetchError(f"cannot fetch {self.url}: the response ended early ({err.expected:,} bytes "
                             "missing); the connection was cut or the server failed") from None
        raise FetchError(f"cannot fetch {self.url}: {err or type(err).__name__}") from None

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all that are left within the limit when ``n`` < 0); b"" at the end."""
        want = self.left if n is None or n < 0 else min(n, self.left)
        parts, size = [], 0
        while size < want:
            data = self._chunk(min(CHUNK, want - size))
            if not data:
                break
            parts.append(data)
            size += len(data)
        self.left -= size
        self.got += size
        return b"".join(parts)

    def more(self) -> bool:
        """Whether the server has bytes beyond the limit (read to tell, then dropped)."""
        return bool(self._chunk(1)) if self.left == 0 else False

    def close(self) -> None:
        self.watchdog.stop()
        self.raw.close()
        self.conn.close()

    def __enter__(self) -> "Response":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _int_header(raw: http.client.HTTPResponse, name: str) -> int | None:
    """A size header's value, None when absent or not a plain number below 10^18."""
    value = (raw.getheader(name) or "").strip()
    return int(value) if re.fullmatch(r"[0-9]{1,18}", value) else None


def _next_location(first: str, current: str, location: str | None) -> str:
    """Where a redirect leads, refused unless it is http(s) on the first URL's host."""
    if not location:
        raise FetchError(f"cannot fetch {first}: a redirect without a Location")
    try:
        target = urljoin(current, location.strip())
        scheme, host = urlsplit(target).scheme.lower(), urlsplit(target).hostname
    except ValueError:  # e.g. an unclosed IPv6 bracket
        raise FetchError(f"cannot fetch {first}: the server redirects to a malformed URL {location[:200]!r}") from None
    if scheme not in ("http", "https"):
        raise FetchError(f"cannot fetch {first}: the server redirects to {target}; only http(s) redirects "
                         "are followed")
    if urlsplit(current).scheme == "https" and scheme == "http":
        raise FetchError(f"cannot fetch {first}: the server redirects from https to plain http ({target}); refused")
    if host != urlsplit(first).hostname:
        raise FetchError(f"cannot fetch {first}: the server redirects to another host ({target}); refused: "
                         "give the final location as data.root")
    return target


def _connect(url: str, start: float):
    """An open connection to ``url``'s server and its watchdog (whose deadline counts from ``start``)."""
    parts = urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    extra = {"context": ssl.create_default_context()} if parts.scheme == "https" else {}
    conn = kind(parts.hostname, parts.port, timeout=TIMEOUT, **extra)
    try:
        conn.connect()
    except BaseException:
        conn.close()
        raise
    return conn, _Watchdog(conn.sock, start)


def _ask(url: str, current: str, headers: dict, began: float):
    """(response head, connection, watchdog) of a GET of ``current`` (``url`` as first asked)."""
    parts = urlsplit(current)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"cannot fetch {url}: only http:// and https:// URLs are read")
    conn = watchdog = None
    try:
        conn, watchdog = _connect(current, began)
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), headers=headers)
        return conn.getresponse(), conn, watchdog
    except (OSError, http.client.HTTPException, ValueError) as err:
        if watchdog is not None:
            watchdog.stop()
        if conn is not None:
            conn.close()
        stalled = watchdog is not None and watchdog.expired
        raise FetchError(f"cannot fetch {url}: " + ("no answer within the deadline" if stalled else
                                                    str(err) or type(err).__name__)) from None


def _range_ok(raw: http.client.HTTPResponse, start: int, size: int) -> bool:
    """Whether a 206 answer holds the range asked for (announced size and first byte)."""
    length, announced = _int_header(raw, "Content-Length"), raw.getheader("Content-Range") or ""
    first = re.match(r"\s*bytes\s+([0-9]{1,18})-", announced)
    return (length is None or length == size) and (first is None or int(first.group(1)) == start)


def open_url(url: str, *, limit: int, start: int | None = None, size: int | None = None) -> Response:
    """The response to a GET of ``url`` (with ``start``/``size``: that byte range), whose body
    yields at most ``limit`` bytes (``size`` for a range); a :class:`FetchError` otherwise."""
    began, current = time.monotonic(), url
    headers = {"Range": f"bytes={start}-{start + size - 1}"} if start is not None else {}
    for _ in range(MAX_REDIRECTS + 1):
        raw, conn, watchdog = _ask(url, current, headers, began)
        if raw.status in REDIRECTS:
            location = raw.getheader("Location")
            Response(url, raw, conn, watchdog, 0).close()
            current = _next_location(url, current, location)
            continue
        response = Response(url, raw, conn, watchdog, limit if start is None else size,
                            skip=start if start is not None and raw.status == 200 else 0)
        problem = _refusal(response, limit, start, size)
        if problem is not None:
            response.close()
            raise FetchError(f"cannot fetch {url}: {problem}")
        return response
    raise FetchError(f"cannot fetch {url}: more than {MAX_REDIRECTS} redirects")


def _refusal(response: Response, limit: int, start: int | None, size: int | None) -> str | None:
    """Why a response is not what was asked for, or None."""
    raw = response.raw
    if raw.status not in (200, 206):
        return f"HTTP {raw.status} {raw.reason}"
    if start is not None and raw.status == 206 and not _range_ok(raw, start, size):
        return (f"asked for {size:,} bytes from {start:,}, the server answered "
                f"{raw.getheader('Content-Range') or 'another range'} ({response.length} bytes); refused")
    if start is None and response.length is not None and response.length > limit:
        return f"{response.length:,} bytes, more than the {limit:,} expected"
    return None


def fetch(url: str, limit: int) -> bytes:
    """The whole body of ``url``, refused when longer than ``limit`` bytes."""
    with open_url(url, limit=limit) as response:
        data = response.read()
        if response.more():
            raise FetchError(f"cannot fetch {url}: more than the {limit:,} bytes expected")
        return data


def fetch_range(url: str, start: int, size: int) -> bytes:
    """``size`` bytes of ``url`` from ``start`` (an HTTP range request)."""
    with open_url(url, limit=size, start=start, size=size) as response:
        data = response.read()
    if len(data) != size:
        raise FetchError(f"cannot fetch {url}: the response ended after {len(data):,} of {size:,} bytes "
                         f"from {start:,}")
    return data


def probe(url: str) -> tuple[int | None, float | None]:
    """``url``'s size and Last-Modified time (seconds since the epoch), None where the server does
    not say; read with a one-byte range (servers without HEAD answer it too)."""
    with open_url(url, limit=1, start=0, size=1) as response:
        total = re.search(r"/\s*([0-9]{1,18})\s*$", response.headers.get("Content-Range") or "")
        size = int(total.group(1)) if response.status == 206 and total else \
            response.length if response.status == 200 else None
        modified = response.headers.get("Last-Modified")
    try:
        return size, email.utils.parsedate_to_datetime(modified).timestamp() if modified else None
    except (TypeError, ValueError, IndexError, OverflowError):
        return size, None
