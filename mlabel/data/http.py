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

And each request survives what object stores do now and then:

- a connect timeout (:data:`CONNECT_TIMEOUT`) and a read timeout (:data:`READ_TIMEOUT`: no byte for
  that long is a stall) on every connection;
- connection errors, timeouts, 408, 429 and 5xx answers are retried, at most :data:`RETRIES` times
  per request, after an exponential backoff with jitter (:data:`BACKOFF_BASE` doubling up to
  :data:`BACKOFF_CAP`) or the server's ``Retry-After`` (capped at :data:`RETRY_AFTER_CAP`);
- a body cut or stalled midway resumes with a range from the first byte missing (the answer
  must start there; a server without ranges answers whole and the bytes already read are skipped);
- then one :class:`FetchError` names the URL, the last status or error and the attempts made.

The overall deadline is not retried: a server that drips bytes would only drip them again.
"""
from __future__ import annotations

import email.utils
import http.client
import random
import re
import socket
import ssl
import threading
import time
from urllib.parse import urljoin, urlsplit

from ..errors import DataError

__all__ = ["FetchError", "Response", "open_url", "fetch", "fetch_range", "probe", "is_url", "same_host"]

TIMEOUT = 60.0  # seconds of slack in every request's overall deadline
MIN_RATE = 64 << 10  # bytes per second a response must average beyond its first TIMEOUT seconds
CONNECT_TIMEOUT = 10.0  # seconds to open a connection (TLS included)
READ_TIMEOUT = 30.0  # seconds a read may wait for the next byte: longer is a stall, retried
RETRIES = 4  # attempts after the first, per request (its resumes included)
BACKOFF_BASE = 0.5  # seconds before the first retry, doubled for each next one (with jitter)
BACKOFF_CAP = 8.0  # the longest our own backoff waits
RETRY_AFTER_CAP = 60.0  # the longest a server's Retry-After is honoured
MAX_REDIRECTS = 5
CHUNK = 1 << 16  # bytes per read: the deadline moves on with every chunk
REDIRECTS = (301, 302, 303, 307, 308)


class FetchError(DataError):
    """A URL could not be read (network, server, deadline or size): not a problem of the data."""


class _Transient(Exception):
    """A failure worth another attempt: ``problem`` for the message, ``retry_after`` in seconds
    when the server said."""

    def __init__(self, problem: str, retry_after: float | None = None):
        super().__init__(problem)
        self.problem, self.retry_after = problem, retry_after


def _retryable_status(status: int) -> bool:
    return status in (408, 429) or 500 <= status <= 599


def _retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (a number or an HTTP date), None when absent or unreadable."""
    value = (value or "").strip()
    if re.fullmatch(r"[0-9]{1,9}", value):
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time()) if value else None
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class _Backoff:
    """The retries of one request: :meth:`wait` sleeps before the next attempt, or raises the one
    :class:`FetchError` once :data:`RETRIES` are spent."""

    def __init__(self, url: str):
        self.url, self.retries, self.began = url, 0, time.monotonic()

    def wait(self, failure: _Transient) -> None:
        if self.retries >= RETRIES:
            raise FetchError(f"cannot fetch {self.url}: {failure.problem} (gave up after {self.retries + 1} attempts "
                             f"in {time.monotonic() - self.began:.1f} s)")
        step = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** self.retries)
        delay = step / 2 + random.uniform(0, step / 2)  # jitter: clients that failed together spread out
        if failure.retry_after is not None:
            delay = max(delay, min(failure.retry_after, RETRY_AFTER_CAP))
        self.retries += 1
        time.sleep(delay)


def _transient_error(err: BaseException) -> bool:
    """Whether a network error may pass on its own (a timeout, a refused or cut connection), unlike a
    certificate that does not verify or a host name that does not exist."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return False
    if isinstance(err, socket.gaierror):
        return err.errno == socket.EAI_AGAIN
    return isinstance(err, (OSError, http.client.HTTPException))


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
    ``limit`` bytes (after skipping ``skip``: a range a server answered with the whole file).

    ``link`` is the (response, connection, watchdog) the answer came on. ``span`` is (position,
    end): ``position`` the resource's offset of the next byte the connection yields and ``end``
    the offset after the last one this answer should hold (None: unknown): a body cut or stalled
    midway is asked for again from ``position`` (:meth:`_resume`), within ``backoff``'s retries."""

    def __init__(self, url: str, link: tuple[http.client.HTTPResponse, object, _Watchdog], limit: int,
                 skip: int = 0, *, backoff: _Backoff | None = None, where: str | None = None,
                 span: tuple[int, int | None] = (0, None)):
        raw, conn, watchdog = link
        position, end = span
        self.url, self.raw, self.conn, self.watchdog = url, raw, conn, watchdog
        self.status, self.headers = raw.status, raw.headers
        self.length = _int_header(raw, "Content-Length")  # as the server announced it
        self.validators = (raw.getheader("ETag"), raw.getheader("Last-Modified"))
        self.backoff, self.where = backoff or _Backoff(url), where or url
        self.position, self.end = position, end
        self.left, self.got = limit, 0
        while skip > 0:
            skipped = self._chunk(min(CHUNK, skip))
            if not skipped:
                raise FetchError(f"cannot fetch {url}: the response ended before the range asked for")
            skip -= len(skipped)
        self.got = 0  # what the caller has read

    def _chunk(self, n: int) -> bytes:
        """Up to ``n`` bytes from the connection; a transient failure resumes on a new one."""
        while True:
            try:
                if self.raw is None:
                    self._resume()
                data = self._read(n)
            except _Transient as failure:
                self._drop()
                if self.end is not None and self.position >= self.end:
                    return b""  # nothing was missing: the connection failed after the last byte
                self.backoff.wait(failure)  # the one FetchError once the retries are spent
                continue
            self.position += len(data)
            return data

    def _read(self, n: int) -> bytes:
        try:
            data = self.raw.read1(n)
        except (OSError, http.client.HTTPException, ValueError) as err:
            self._fail(err)
        if not data and n and self.raw.length:
            self._fail(http.client.IncompleteRead(b"", self.raw.length))  # read1 returns b"" early
        if not data and n and self.watchdog.expired:
            self._fail(TimeoutError())
        self.watchdog.received += len(data)
        return data

    def _fail(self, err: BaseException):
        """A read failed: :class:`_Transient` when another attempt may succeed, else the FetchError."""
        if self.watchdog.expired:
            self.close()
            raise FetchError(f"cannot fetch {self.url}: the server did not send it within its deadline "
                             f"({TIMEOUT:g} s plus {MIN_RATE:,} bytes a second): it is stalled or too slow") from None
        if isinstance(err, http.client.IncompleteRead):
            raise _Transient(f"the response ended early ({err.expected:,} bytes missing); the connection was cut "
                             "or the server failed")
        if isinstance(err, TimeoutError):
            raise _Transient(f"no byte for {READ_TIMEOUT:g} s after {self.position:,} (timed out): the server stalled")
        if _transient_error(err):
            raise _Transient(f"the connection failed after {self.position:,} bytes ({err or type(err).__name__})")
        self.close()
        raise FetchError(f"cannot fetch {self.url}: {err or type(err).__name__}") from None

    def _drop(self) -> None:
        """Let go of a failed connection (a later read resumes on a new one)."""
        if self.raw is not None:
            self.close()
            self.raw = None

    def _resume(self) -> None:
        """Ask again for the bytes from ``position`` on, with a range; the answer must start there
        (a 200 is the whole resource: the bytes before ``position`` are skipped, if it did not change)."""
        last = "" if self.end is None else self.end - 1
        raw, conn, watchdog = _ask(self.url, self.where, {"Range": f"bytes={self.position}-{last}"}, time.monotonic())
        self.raw, self.conn, self.watchdog = raw, conn, watchdog
        if _retryable_status(raw.status):
            raise _Transient(f"HTTP {raw.status} {raw.reason}", _retry_after(raw.getheader("Retry-After")))
        announced = re.match(r"\s*bytes\s+([0-9]{1,18})-", raw.getheader("Content-Range") or "")
        if raw.status == 206 and (announced is None or int(announced.group(1)) == self.position):
            return
        if raw.status == 200 and self.validators == (raw.getheader("ETag"), raw.getheader("Last-Modified")):
            skip = self.position
            while skip > 0:
                skipped = self._read(min(CHUNK, skip))
                if not skipped:
                    raise _Transient("the response ended before the bytes already read")
                skip -= len(skipped)
            return
        self.close()
        why = "it changed on the server while it was read" if raw.status == 200 else \
            f"HTTP {raw.status} {raw.reason} {raw.getheader('Content-Range') or ''}".strip()
        raise FetchError(f"cannot fetch {self.url}: resuming at byte {self.position:,} failed: {why}")

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
        if self.raw is not None:
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
    conn = kind(parts.hostname, parts.port, timeout=CONNECT_TIMEOUT, **extra)
    try:
        conn.connect()
        conn.sock.settimeout(READ_TIMEOUT)  # from here on, each read waits at most this long
    except BaseException:
        conn.close()
        raise
    return conn, _Watchdog(conn.sock, start)


def _ask(url: str, current: str, headers: dict, began: float):
    """(response head, connection, watchdog) of a GET of ``current`` (``url`` as first asked);
    :class:`_Transient` for a failure another attempt may not meet."""
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
        if watchdog is not None and watchdog.expired:
            raise FetchError(f"cannot fetch {url}: no answer within the deadline") from None
        if not isinstance(err, ValueError) and _transient_error(err):
            raise _Transient(f"no answer ({err or type(err).__name__})") from None
        raise FetchError(f"cannot fetch {url}: {err or type(err).__name__}") from None


def _range_ok(raw: http.client.HTTPResponse, start: int, size: int) -> bool:
    """Whether a 206 answer holds the range asked for (announced size and first byte)."""
    length, announced = _int_header(raw, "Content-Length"), raw.getheader("Content-Range") or ""
    first = re.match(r"\s*bytes\s+([0-9]{1,18})-", announced)
    return (length is None or length == size) and (first is None or int(first.group(1)) == start)


def open_url(url: str, *, limit: int, start: int | None = None, size: int | None = None) -> Response:
    """The response to a GET of ``url`` (with ``start``/``size``: that byte range), whose body
    yields at most ``limit`` bytes (``size`` for a range); a :class:`FetchError` otherwise. A
    transient failure is tried again (at most :data:`RETRIES` times, the body's resumes included)."""
    backoff = _Backoff(url)
    while True:
        try:
            return _open(url, limit, start, size, backoff)
        except _Transient as failure:
            backoff.wait(failure)


def _open(url: str, limit: int, start: int | None, size: int | None, backoff: _Backoff) -> Response:
    """One attempt of :func:`open_url` (its redirects followed)."""
    began, current = time.monotonic(), url
    headers = {"Range": f"bytes={start}-{start + size - 1}"} if start is not None else {}
    for _ in range(MAX_REDIRECTS + 1):
        raw, conn, watchdog = _ask(url, current, headers, began)
        if raw.status in REDIRECTS:
            location = raw.getheader("Location")
            _hang_up(raw, conn, watchdog)
            current = _next_location(url, current, location)
            continue
        if _retryable_status(raw.status):
            _hang_up(raw, conn, watchdog)
            raise _Transient(f"HTTP {raw.status} {raw.reason}", _retry_after(raw.getheader("Retry-After")))
        problem = _refusal(raw, limit, start, size)
        if problem is not None:
            _hang_up(raw, conn, watchdog)
            raise FetchError(f"cannot fetch {url}: {problem}")
        whole = start is None or raw.status == 200
        end = (start + size) if start is not None else _int_header(raw, "Content-Length")
        return Response(url, (raw, conn, watchdog), limit if start is None else size,
                        skip=start if start is not None and raw.status == 200 else 0, backoff=backoff,
                        where=current, span=(0 if whole else start, end))
    raise FetchError(f"cannot fetch {url}: more than {MAX_REDIRECTS} redirects")


def _hang_up(raw: http.client.HTTPResponse, conn, watchdog: _Watchdog) -> None:
    watchdog.stop()
    raw.close()
    conn.close()


def _refusal(raw: http.client.HTTPResponse, limit: int, start: int | None, size: int | None) -> str | None:
    """Why a response's head is not what was asked for, or None."""
    length = _int_header(raw, "Content-Length")
    if raw.status not in (200, 206):
        return f"HTTP {raw.status} {raw.reason}"
    if start is not None and raw.status == 206 and not _range_ok(raw, start, size):
        return (f"asked for {size:,} bytes from {start:,}, the server answered "
                f"{raw.getheader('Content-Range') or 'another range'} ({length} bytes); refused")
    if start is None and length is not None and length > limit:
        return f"{length:,} bytes, more than the {limit:,} expected"
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
