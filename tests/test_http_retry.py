"""HTTP that survives object stores (issue 30, item 6): every request has connect and read
timeouts; connection errors, timeouts, 429 and 5xx are retried a bounded number of times with
exponential backoff and jitter (a Retry-After honoured, capped); a body cut or stalled midway
resumes where it stopped; then one error names the URL and the status. Local servers on
127.0.0.1; the backoff constants are shrunk so that the suite stays fast."""
import email.utils
import http.server
import socket
import threading
import time

import pytest

from mlabel.data import http as web
from mlabel.data.http import FetchError, fetch, fetch_range, open_url

BODY = bytes(range(256)) * 64  # 16 KiB, every offset distinguishable


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    """Backoff in hundredths of a second; a stall is noticed after 0.3 s."""
    monkeypatch.setattr(web, "BACKOFF_BASE", 0.01)
    monkeypatch.setattr(web, "BACKOFF_CAP", 0.05)
    monkeypatch.setattr(web, "RETRY_AFTER_CAP", 5.0)
    monkeypatch.setattr(web, "READ_TIMEOUT", 0.3)
    monkeypatch.setattr(web, "CONNECT_TIMEOUT", 0.5)


class Server:
    """127.0.0.1 answering each GET with ``script[n]`` for the n-th request (the last entry for
    the rest): ``"serve"``, an int status, ``("retry-after", status, value)``, ``("stall", k)``
    (send the first k bytes of the answer, then nothing until the test ends) or ``("whole", etag)``
    (the whole body whatever the range). Ranges honoured otherwise; ETag "v1"."""

    def __init__(self, script):
        self.script, self.requests, self.release = list(script), [], threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                server.requests.append(dict(self.headers))
                step = server.script[min(len(server.requests), len(server.script)) - 1]
                server.answer(self, step)

            def log_message(self, *args):
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/data.bin"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def answer(self, request, step) -> None:
        if isinstance(step, int):
            request.send_response(step)
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        if step[0] == "retry-after":
            request.send_response(step[1])
            request.send_header("Retry-After", step[2])
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        data, status, wanted = BODY, 200, request.headers.get("Range")
        if step[0] == "whole":  # ("whole", etag): a server without ranges, the resource at that version
            wanted, step, etag = None, "serve", step[1]
        else:
            etag = '"v1"'
        if wanted:
            first, _, last = wanted.split("=")[1].partition("-")
            start, stop = int(first), int(last) if last else len(BODY) - 1
            data, status = BODY[start:stop + 1], 206
        request.send_response(status)
        if wanted:
            request.send_header("Content-Range", f"bytes {start}-{start + len(data) - 1}/{len(BODY)}")
        request.send_header("Content-Length", str(len(data)))
        request.send_header("ETag", etag)
        request.end_headers()
        if step == "serve":
            request.wfile.write(data)
            return
        request.wfile.write(data[:step[1]])  # ("stall", k): k bytes, then silence
        request.wfile.flush()
        self.release.wait(30)
        request.close_connection = True

    def close(self) -> None:
        self.release.set()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(*script):
        servers.append(Server(script))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def _bound() -> float:
    """The longest all the retries' own backoff may sleep."""
    return sum(min(web.BACKOFF_CAP, web.BACKOFF_BASE * 2 ** k) for k in range(web.RETRIES))


def test_503_twice_then_served(serve):
    server = serve(503, 503, "serve")
    started = time.monotonic()
    assert fetch(server.url, len(BODY)) == BODY
    print(f"503, 503, then 200: {len(server.requests)} requests, {time.monotonic() - started:.2f} s")
    assert len(server.requests) == 3


@pytest.mark.parametrize("status", [429, 500, 502, 504])
def test_429_and_5xx_are_retried(serve, status):
    server = serve(status, "serve")
    assert fetch_range(server.url, 100, 50) == BODY[100:150]
    assert len(server.requests) == 2


def test_retry_after_is_honoured(serve):
    server = serve(("retry-after", 429, "1"), "serve")
    started = time.monotonic()
    assert fetch(server.url, len(BODY)) == BODY
    waited = time.monotonic() - started
    print(f"Retry-After: 1 -> waited {waited:.2f} s (own backoff at most {_bound():.2f} s)")
    assert 1.0 <= waited < 3.0


def test_retry_after_as_a_date_and_beyond_the_cap(serve, monkeypatch):
    monkeypatch.setattr(web, "RETRY_AFTER_CAP", 0.4)
    later = email.utils.formatdate(time.time() + 3600, usegmt=True)
    server = serve(("retry-after", 503, later), ("retry-after", 503, "86400"), "serve")
    started = time.monotonic()
    assert fetch(server.url, len(BODY)) == BODY
    waited = time.monotonic() - started
    print(f"Retry-After in an hour, then a day, capped at 0.4 s: waited {waited:.2f} s")
    assert 0.8 <= waited < 2.5


@pytest.mark.parametrize("read", ["fetch", "stream"])
def test_a_body_stalled_midway_resumes_where_it_stopped(serve, read):
    """The server sends 5000 bytes and stops: after the read timeout the rest is asked for with a
    range from byte 5000 (not the whole again) and the bytes come out whole and in order."""
    server = serve(("stall", 5000), "serve")
    started = time.monotonic()
    if read == "fetch":
        data = fetch(server.url, len(BODY))
    else:
        with open_url(server.url, limit=len(BODY)) as stream:  # as a shard scan reads it: tarfile's reads
            data = b"".join(iter(lambda: stream.read(1000), b""))
    elapsed = time.monotonic() - started
    print(f"stalled after 5000 bytes ({read}): resumed, {elapsed:.2f} s, ranges asked: "
          f"{[r.get('Range') for r in server.requests]}")
    assert data == BODY
    assert server.requests[1].get("Range") == f"bytes=5000-{len(BODY) - 1}"
    assert elapsed < web.READ_TIMEOUT + _bound() + 2


def test_a_stalled_range_resumes_within_the_range(serve):
    server = serve(("stall", 30), "serve")
    assert fetch_range(server.url, 1000, 100) == BODY[1000:1100]
    assert [r.get("Range") for r in server.requests] == ["bytes=1000-1099", "bytes=1030-1099"]


def test_a_resume_answered_whole_skips_what_was_read_unless_it_changed(serve):
    """A server without ranges answers the resume with the whole body: the bytes already read are
    skipped when it is the same version (same ETag); a new version mid-read is an error, never a
    splice of two versions."""
    server = serve(("stall", 5000), ("whole", '"v1"'))
    assert fetch(server.url, len(BODY)) == BODY
    server = serve(("stall", 5000), ("whole", '"v2"'))
    with pytest.raises(FetchError, match=r"resuming at byte 5,000 failed: it changed on the server"):
        fetch(server.url, len(BODY))


def test_a_server_that_always_fails_is_one_error_in_bounded_time(serve):
    server = serve(503)
    started = time.monotonic()
    with pytest.raises(FetchError) as caught:
        fetch(server.url, len(BODY))
    elapsed = time.monotonic() - started
    message = str(caught.value)
    print(f"always 503: {len(server.requests)} requests, {elapsed:.2f} s; {message}")
    assert server.url in message and "HTTP 503" in message and f"{web.RETRIES + 1} attempts" in message
    assert len(server.requests) == web.RETRIES + 1
    assert elapsed < _bound() + 2


def test_a_server_that_always_stalls_is_one_error_in_bounded_time(serve):
    server = serve(("stall", 0))
    started = time.monotonic()
    with pytest.raises(FetchError) as caught:
        fetch(server.url, len(BODY))
    elapsed = time.monotonic() - started
    print(f"always stalls: {len(server.requests)} requests, {elapsed:.2f} s; {caught.value}")
    assert server.url in str(caught.value) and "timed out" in str(caught.value)
    assert len(server.requests) == web.RETRIES + 1
    assert elapsed < (web.RETRIES + 1) * web.READ_TIMEOUT + _bound() + 2


def test_refused_connections_are_retried_then_named(serve):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x"
    started = time.monotonic()
    with pytest.raises(FetchError, match=rf"cannot fetch {url}: .*refused.*{web.RETRIES + 1} attempts"):
        fetch(url, 10)
    assert time.monotonic() - started < _bound() + 2


def test_a_client_error_is_not_retried(serve):
    server = serve(404)
    with pytest.raises(FetchError, match=r"HTTP 404"):
        fetch(server.url, len(BODY))
    assert len(server.requests) == 1


def test_every_request_has_connect_and_read_timeouts(serve, monkeypatch):
    """Each connection opens under the connect timeout and then reads under the read timeout:
    the first request and the resumed one alike."""
    seen = []
    real = web._connect

    def spy(*args):
        conn, watchdog = real(*args)
        seen.append((conn.timeout, conn.sock.gettimeout()))
        return conn, watchdog
    monkeypatch.setattr(web, "_connect", spy)
    server = serve(("stall", 5000), "serve")
    assert fetch(server.url, len(BODY)) == BODY
    assert seen == [(web.CONNECT_TIMEOUT, web.READ_TIMEOUT)] * 2
