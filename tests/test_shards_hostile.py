"""Shards and HTTP under attack (issue 27, section 3): two writers into one folder, a stale index
over HTTP, URLs that local data names, redirects, unbounded and stalled responses, and every
field of the shard index, labels.json and the samples' JSON validated with the file named."""
import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlabel.config import load_config
from mlabel.data import DataError, build_splits
from mlabel.data.__main__ import main as data_main
from mlabel.data.shards import read_member, read_vocabulary, read_wds_table

SCENES = ["data.generate=null", "data.val=val.csv", "data.test=null"]


@pytest.fixture(scope="module")
def shards(scene_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "s"
    assert data_main(["shard", "quickstart", f"data.root={scene_csv}", *SCENES, "--out", str(out),
                      "--shard-size", "10"]) == 0
    return out


@pytest.fixture
def copy(shards, tmp_path) -> Path:
    """A copy of the shards to damage (times kept, as a copy that preserves them)."""
    out = tmp_path / "copy"
    shutil.copytree(shards, out)
    return out


def _rewrite(path: Path, change) -> None:
    """Rewrite a shard member by member: ``change(name, data)`` -> (name, data)."""
    with tarfile.open(path) as tar:
        members = [(info.name, tar.extractfile(info).read()) for info in tar]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            name, data = change(name, data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


class Server:
    """A local HTTP server on 127.0.0.1 serving ``root`` with range requests, Last-Modified when
    ``modified``, and hostile answers under ``routes`` (path -> handler(request))."""

    def __init__(self, root: Path):
        self.root, self.modified, self.routes, self.requests, self.sent = root, True, {}, [], 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                server.requests.append(self.path)
                route = server.routes.get(self.path.split("?")[0])
                if route is not None:
                    route(self)
                    return
                server.serve_file(self)

            def log_message(self, *args):
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def serve_file(self, request) -> None:
        path = self.root / request.path.lstrip("/")
        if not path.is_file():
            request.send_error(404)
            return
        data, status = path.read_bytes(), 200
        total, wanted = len(data), request.headers.get("Range")
        if wanted:
            start, stop = (int(x) for x in wanted.split("=")[1].split("-"))
            data, status = data[start:stop + 1], 206
        request.send_response(status)
        if wanted:
            request.send_header("Content-Range", f"bytes {start}-{start + len(data) - 1}/{total}")
        if self.modified:
            request.send_header("Last-Modified", self.http_date(path.stat().st_mtime))
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    @staticmethod
    def http_date(seconds: float) -> str:
        import email.utils
        return email.utils.formatdate(seconds, usegmt=True)

    def stream(self, request, status: int, length: int, chunk: bytes, count: int, headers=()) -> None:
        """Answer with ``count`` times ``chunk`` (counting what the client took)."""
        request.send_response(status)
        request.send_header("Content-Length", str(length))
        for key, value in headers:
            request.send_header(key, value)
        request.end_headers()
        try:
            for _ in range(count):
                request.wfile.write(chunk)
                self.sent += len(chunk)
        except OSError:
            pass  # the client hung up: what it did not take stays unsent

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def server(copy):
    running = Server(copy)
    yield running
    running.close()


# ------------------------------------------------------------- item 1: two writers


def test_two_shard_writers_into_one_folder_never_mix(scene_csv, tmp_path):
    """Two real processes write shards into one --out: the second stops at once naming the first
    (no exit 0, no mixed folder); the first finishes, its shards read back as the CSV says."""
    out, started, release = tmp_path / "out", tmp_path / "started", tmp_path / "release"
    first = subprocess.Popen([sys.executable, "-c", f"""
import time
from pathlib import Path
from mlabel.config import load_config
from mlabel.data import build_splits
from mlabel.data.shards import write_shards
cfg = load_config("quickstart", {[f"data.root={scene_csv}", *SCENES]!r})
def wait(path):  # the writer is inside (the folder its own) until the test lets it go
    Path({str(started)!r}).touch()
    deadline = time.time() + 300
    while not Path({str(release)!r}).exists() and time.time() < deadline:
        time.sleep(0.05)
write_shards(build_splits(cfg.data, "auto", 0), Path({str(out)!r}), 100, Path({str(scene_csv)!r}), check=wait,
             log=lambda *a: None)
"""], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not started.exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "timeout"
            time.sleep(0.1)
        second = subprocess.run([sys.executable, "-m", "mlabel.data", "shard", "quickstart", f"data.root={scene_csv}",
                                 *SCENES, "--out", str(out), "--shard-size", "60"], capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"pid {first.pid} " in second.stderr and "mlabel data shard" in second.stderr
        assert "internal error" not in second.stderr
    finally:
        release.touch()
        assert first.wait(timeout=300) == 0, first.stderr.read()
    splits = build_splits(load_config("quickstart", [f"data.root={scene_csv}", *SCENES]).data, "auto", 0)
    tree = json.loads((out / "labels.json").read_text())
    assert tree["splits"]["train"]["samples"] == [48] and tree["splits"]["val"]["samples"] == [24]
    for name in ("train", "val"):
        table = read_wds_table(out, name)
        assert len(set(table.paths)) == len(table) == len(getattr(splits, name))  # no key twice
        np.testing.assert_array_equal(table.dense_targets(), getattr(splits, name).targets)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = subprocess.run([sys.executable, "-m", "mlabel.data", "shard", "quickstart", f"data.root={scene_csv}",
                            *SCENES, "--out", str(out), "--shard-size", "60"], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 2 and "another source" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and ".lock" not in before


# ------------------------------------------------------------- item 2: a stale index over HTTP


def _relabel(path: Path, key: str, labels: list) -> None:
    """Give one sample other labels, the shard keeping its size (tar pads members to 512 bytes)."""
    size = path.stat().st_size

    def change(name, data):
        if name == f"{key}.json":
            meta = json.loads(data)
            meta["labels"] = labels
            data = json.dumps(meta).encode()
        return name, data
    _rewrite(path, change)
    assert path.stat().st_size == size


def test_a_stale_index_over_http_is_found_by_the_shards_times(copy, server):
    """Shards re-made from relabelled data (same sizes) beside the old labels.json and index:
    read over HTTP they are scanned again (Last-Modified newer than the index's), as locally."""
    index_time = (copy / "train.index.npz").stat().st_mtime
    _relabel(copy / "train-000001.tar", "000000013", ["circle", "star"])
    os.utime(copy / "train-000001.tar", (index_time + 10, index_time + 10))
    remote, local = read_wds_table(server.url, "train"), read_wds_table(copy, "train")
    row = [p.endswith("#000000013") for p in remote.paths].index(True)
    assert [remote.labels[j] for j in np.flatnonzero(remote.dense_targets()[row] == 1)] == ["circle", "star"]
    np.testing.assert_array_equal(remote.dense_targets(), local.dense_targets())


def test_an_old_index_kept_beside_new_shards_is_found_by_its_digest(copy, server):
    """labels.json written with the relabelled shards, the old index copied back over the new
    one and made newest: found by the index's SHA-256 in labels.json, over HTTP without
    Last-Modified and locally."""

    from mlabel.data.shards.write import _write_index
    old = (copy / "train.index.npz").read_bytes()
    _relabel(copy / "train-000001.tar", "000000013", ["circle", "star"])
    tree = json.loads((copy / "labels.json").read_text())
    shards = tree["splits"]["train"]["shards"]
    tree["splits"]["train"].update(_write_index(copy, "train", shards, tree))  # as mlabel data shard writes it
    (copy / "labels.json").write_text(json.dumps(tree))
    (copy / "train.index.npz").write_bytes(old)  # newest file of the folder: times tell nothing
    server.modified = False
    for root in (server.url, copy):
        table = read_wds_table(root, "train")
        row = [p.endswith("#000000013") for p in table.paths].index(True)
        assert [table.labels[j] for j in np.flatnonzero(table.dense_targets()[row] == 1)] == ["circle", "star"], root


# ------------------------------------------------------------- item 3: security


def test_local_labels_json_cannot_make_mlabel_fetch(copy, server):
    tree = json.loads((copy / "labels.json").read_text())
    tree["splits"]["train"]["shards"] = [f"{server.url}/{n}" for n in tree["splits"]["train"]["shards"]]
    (copy / "labels.json").write_text(json.dumps(tree))
    with pytest.raises(DataError, match=r"labels.json: splits.train.shards names the URL http://127.*data.root"):
        read_wds_table(copy, "val")
    tree["splits"]["train"]["shards"] = [n.rsplit("/", 1)[1] for n in tree["splits"]["train"]["shards"]]
    tree["splits"]["train"]["index"] = f"{server.url}/train.index.npz"
    (copy / "labels.json").write_text(json.dumps(tree))
    with pytest.raises(DataError, match=r"splits.train.index names the URL"):
        read_wds_table(copy, "train")
    (copy / "labels.json").write_text(json.dumps({"labels": tree["labels"]}))
    with pytest.raises(DataError, match=r"data split 'http.*names the URL"):  # a URL split under a local root
        read_wds_table(copy, f"{server.url}/train-000000.tar")
    assert server.requests == []  # nothing was fetched


def test_a_server_cannot_name_local_files_or_other_servers(copy, server):
    tree = json.loads((copy / "labels.json").read_text())
    for shards, message in (([str(copy / "train-000000.tar")], "names the local file"),
                            (["http://localhost:1/train-000000.tar"], "another server")):
        tree["splits"]["train"]["shards"] = shards
        (copy / "labels.json").write_text(json.dumps(tree))
        with pytest.raises(DataError, match=message):
            read_wds_table(server.url, "val")
    assert all(p == "/labels.json" for p in server.requests)


def _redirect(location):
    def answer(request):
        request.send_response(302)
        request.send_header("Location", location(request))
        request.send_header("Content-Length", "0")
        request.end_headers()
    return answer


def test_redirects_stay_on_http_and_on_the_host(server):
    port = server.http.server_address[1]
    server.routes["/moved/labels.json"] = _redirect(lambda r: "/labels.json")
    assert read_vocabulary(f"{server.url}/moved").labels  # the same host: followed
    cases = {"/other/labels.json": (f"http://localhost:{port}/labels.json", "another host"),
             "/ftp/labels.json": (f"ftp://127.0.0.1:{port}/labels.json", "only http"),
             "/file/labels.json": ("file:///etc/passwd", "only http")}
    for path, (location, message) in cases.items():
        server.routes[path] = _redirect(lambda r, location=location: location)
        with pytest.raises(DataError, match=rf"cannot fetch {server.url}{path}: .*{message}"):
            read_vocabulary(f"{server.url}{path.rsplit('/', 1)[0]}")
    server.routes["/loop/labels.json"] = _redirect(lambda r: "/loop/labels.json")
    with pytest.raises(DataError, match="redirects"):
        read_vocabulary(f"{server.url}/loop")
    assert not any(p.startswith("/etc") for p in server.requests)


HUGE = 256 << 20


def test_a_huge_answer_to_a_range_is_not_read_whole(server, copy):
    from mlabel.data.shards import member_bytes
    data = (copy / "train-000000.tar").read_bytes()
    block = bytes(1 << 20)
    # a 206 of 256 MB for 100 bytes: refused, and the body is left unread
    server.routes["/huge206.tar"] = lambda r: server.stream(r, 206, HUGE, block, HUGE >> 20)
    started = time.monotonic()
    with pytest.raises(DataError, match=r"cannot fetch .*/huge206.tar: asked for 100 bytes from 512"):
        member_bytes((f"{server.url}/huge206.tar", 512, 100), "x")
    # a server without ranges (200, the whole file, here 256 MB): the range is cut out of the stream
    server.routes["/huge200.tar"] = lambda r: _whole_then_more(server, r, data, block)
    assert member_bytes((f"{server.url}/huge200.tar", 512, 100), "x") == data[512:612]
    time.sleep(0.5)
    assert server.sent < 64 << 20 and time.monotonic() - started < 60  # not the 512 MB offered


def _whole_then_more(server, request, data, block):
    request.send_response(200)
    request.send_header("Content-Length", str(len(data) + HUGE))
    request.end_headers()
    try:
        request.wfile.write(data)
        for _ in range(HUGE >> 20):
            request.wfile.write(block)
            server.sent += len(block)
    except OSError:
        pass


def test_a_huge_vocabulary_is_refused_unread(server, monkeypatch):
    from mlabel.data.shards import read as shard_module
    monkeypatch.setattr(shard_module, "MAX_VOCABULARY_BYTES", 1 << 20)
    block = b" " * (1 << 20)
    server.routes["/big/labels.json"] = lambda r: server.stream(r, 200, HUGE, block, HUGE >> 20)
    with pytest.raises(DataError, match=r"more than the 1,048,576 expected"):
        read_vocabulary(f"{server.url}/big")

    def no_length(request):  # no Content-Length: the body ends when the connection does
        request.protocol_version = "HTTP/1.0"
        request.send_response(200)
        request.end_headers()
        try:
            for _ in range(HUGE >> 20):
                request.wfile.write(block)
                server.sent += len(block)
        except OSError:
            pass
        request.close_connection = True
    server.routes["/endless/labels.json"] = no_length
    with pytest.raises(DataError, match=r"more than the 1,048,576 bytes expected"):
        read_vocabulary(f"{server.url}/endless")
    time.sleep(0.5)
    assert server.sent < 64 << 20


def _in_thread(call, seconds: float):
    """``call()``'s outcome, and whether it came within ``seconds`` (a hang fails, not stalls)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            outcome["error"] = err
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome, not thread.is_alive()


def test_a_dripping_server_meets_an_overall_deadline(server, monkeypatch):
    """One byte every 0.2 s (each read succeeds, so a per-read timeout never fires): cut off at
    the overall deadline (set to 1 s here), for a body and for the headers."""
    from mlabel.data import http as http_module
    from mlabel.data.shards import member_bytes
    monkeypatch.setattr(http_module, "TIMEOUT", 1.0)

    def drip_body(request):
        request.send_response(206)
        request.send_header("Content-Length", "1000")
        request.send_header("Content-Range", "bytes 0-999/5000")
        request.end_headers()
        try:
            for _ in range(1000):
                request.wfile.write(b"x")
                request.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass

    def drip_head(request):
        try:
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 1000:
                request.wfile.write(bytes([byte]))
                request.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass
        request.close_connection = True
    server.routes["/drip.tar"], server.routes["/head/labels.json"] = drip_body, drip_head
    for call in (lambda: member_bytes((f"{server.url}/drip.tar", 0, 1000), "x"),
                 lambda: read_vocabulary(f"{server.url}/head")):
        started = time.monotonic()
        outcome, ended = _in_thread(call, 20)
        assert ended, "still waiting on the server after 20 s"
        assert isinstance(outcome.get("error"), DataError) and "deadline" in str(outcome["error"])
        assert time.monotonic() - started < 6


# ------------------------------------------------------------- item 4: every field validated


def test_a_truncated_range_or_stream_is_a_data_error(server, copy):
    data = (copy / "train-000000.tar").read_bytes()

    def half(request):  # announces the whole answer, sends half, hangs up
        wanted = request.headers.get("Range")
        body = data
        if wanted:
            start, stop = (int(x) for x in wanted.split("=")[1].split("-"))
            body = data[start:stop + 1]
        request.send_response(206 if wanted else 200)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body[:len(body) // 2])
        request.close_connection = True
    server.routes["/cut/train-000000.tar"] = half
    with pytest.raises(DataError, match=r"cannot fetch .*/cut/train-000000.tar: the response ended early"):
        read_member((f"{server.url}/cut/train-000000.tar", 512, 4000), "x")
    shutil.copy(copy / "labels.json", copy / "cut.json")
    with pytest.raises(DataError, match=r"cut/train-000000.tar: the response ended early"):
        read_wds_table(server.url, "cut/train-000000.tar")


@pytest.mark.parametrize("labels", [[["sea"]], [{"sea": 1}], {"sea": 1}, "sea", [1], [None]])
def test_sample_labels_that_are_not_names_are_named(copy, labels):
    def change(name, data):
        return name, (json.dumps({"labels": labels}).encode() if name == "000000003.json" else data)
    _rewrite(copy / "train-000000.tar", change)
    with pytest.raises(DataError, match=r"train-000000.tar#000000003: sample 000000003 'labels' must be a list of "
                                        r"label names"):
        read_wds_table(copy, "train-{000000..000004}.tar")
    skipped = []
    assert len(read_wds_table(copy, "train-{000000..000004}.tar", skip_bad=True, skipped=skipped)) == 47
    assert len(skipped) == 1


def test_shards_written_by_webdataset_with_non_ascii_keys_read_back(tmp_path):
    wds = pytest.importorskip("webdataset")
    rng = np.random.default_rng(0)
    from mlabel.data.shards import shard_image_bytes
    keys = ["échantillon-0", "サンプル-1", "dir/ünï-2", "hash#3"]
    written = {}
    with wds.TarWriter(str(tmp_path / "w-000000.tar")) as sink:
        for i, key in enumerate(keys):
            pixels = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            labels = [["a"], ["b", "c"], [], ["a", "c"]][i]
            sink.write({"__key__": key, "png": buffer.getvalue(), "json": {"labels": labels}})
            written[key] = (pixels, labels)
    (tmp_path / "labels.json").write_text(json.dumps({"labels": ["a", "b", "c"], "splits": {
        "train": {"shards": ["w-000000.tar"]}}}))
    table = read_wds_table(tmp_path, "train")
    reference = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "w-000000.tar"), shardshuffle=False)]
    assert [p.split(".tar#", 1)[1] for p in table.paths] == reference == keys
    for row, key in enumerate(keys):
        pixels, labels = written[key]
        assert [table.labels[j] for j in np.flatnonzero(table.dense_targets()[row] == 1)] == labels
        np.testing.assert_array_equal(table.read_image(row), pixels)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(shard_image_bytes(table.paths[row])))), pixels)


def _index_case(copy: Path, change) -> None:
    """Rewrite train.index.npz through ``change(arrays)`` (or as the bytes ``change``), with labels.json
    agreeing with it (hostile data consistent with itself: only validation can refuse it)."""
    path = copy / "train.index.npz"
    if callable(change):
        with np.load(path) as saved:
            arrays = change({k: saved[k] for k in saved.files})
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        change = buffer.getvalue()
    data = change
    path.write_bytes(data)
    tree = json.loads((copy / "labels.json").read_text())
    tree["splits"]["train"].update(index_bytes=len(data), index_sha256=hashlib.sha256(data).hexdigest())
    (copy / "labels.json").write_text(json.dumps(tree))


def _set(name, at, value):
    def change(arrays):
        arrays[name] = arrays[name].copy()
        arrays[name][at] = value
        return arrays
    return change


INDEX_CASES = {
    "negative label": (_set("pos_labels", 0, -1), "'pos_labels' holds -1, outside"),
    "label past the vocabulary": (_set("pos_labels", 0, 6), "'pos_labels' holds 6, outside"),
    "negative shard": (_set("shard", 3, -2), "'shard' holds -2"),
    "shard past the split": (_set("shard", 3, 5), "'shard' holds 5"),
    "negative offset": (_set("offset", 0, -7), "'offset' holds -7"),
    "image past its shard": (_set("offset", 0, 10 << 20), "lies beyond the end of shard 0"),
    "row past the samples": (_set("pos_rows", 0, 48), "'pos_rows' holds 48"),
    "negative size": (_set("size", 1, -1), "'size' holds -1"),
    "missing array": (lambda a: {k: v for k, v in a.items() if k != "other_rows"}, "lacks the array 'other_rows'"),
    "2-D array": (lambda a: {**a, "offset": a["offset"][:, None]}, "'offset' must be a list of whole numbers"),
    "float array": (lambda a: {**a, "size": a["size"].astype(float)}, "'size' must be a list of whole numbers"),
    "lengths disagree": (lambda a: {**a, "pos_rows": a["pos_rows"][1:]}, "arrays of different lengths"),
    "samples disagree": (lambda a: {k: v[:47] if k in ("shard", "key", "offset", "size") else v
                                    for k, v in a.items()} | {"pos_rows": np.zeros(0, int), "pos_labels": np.zeros(0, int),
                                                              "other_rows": np.zeros(0, int), "other_labels": np.zeros(0, int)},
                         "does not hold the samples labels.json lists"),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_every_array_of_the_shard_index_is_checked(copy, case):
    change, message = INDEX_CASES[case]
    _index_case(copy, change)
    with pytest.raises(DataError, match=r"shard index .*train.index.npz.*" + message.replace("(", r"\(")):
        read_wds_table(copy, "train")


@pytest.mark.parametrize("damage", ["truncated", "not a zip", "a bare .npy", "huge header"])
def test_a_damaged_index_file_is_named(copy, damage):
    path = copy / "train.index.npz"
    data = path.read_bytes()
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "not a zip":
        data = b"hello, not an archive" * 10
    elif damage == "a bare .npy":
        buffer = io.BytesIO()
        np.save(buffer, np.arange(4))
        data = buffer.getvalue()
    else:  # an 'offset' array whose header claims 10^12 values, holding none
        import zipfile
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<i8", "fortran_order": False, "shape": (10**12,)})
        buffer = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(data)) as old, zipfile.ZipFile(buffer, "w") as new:
            for info in old.infolist():
                new.writestr(info.filename, b"\x93NUMPY\x01\x00" + header.getvalue()[8:] if info.filename == "offset.npy"
                             else old.read(info))
        data = buffer.getvalue()
    _index_case(copy, data)
    with pytest.raises(DataError, match=r"shard index .*train.index.npz"):
        read_wds_table(copy, "train")


def test_an_index_larger_than_the_vocabulary_is_refused(copy):
    tree = json.loads((copy / "labels.json").read_text())
    tree["labels"] = tree["labels"][:2]  # the index numbers six labels
    (copy / "labels.json").write_text(json.dumps(tree))
    with pytest.raises(DataError, match=r"train.index.npz: array 'pos_labels' holds \d, outside the 2 labels"):
        read_wds_table(copy, "train", labels=tree["labels"])


def _deep(depth):
    return "[" * depth + "]" * depth


LABELS_JSON_CASES = {
    "splits a list": (lambda t: {**t, "splits": []}, "'splits' must be an object"),
    "a split a list": (lambda t: {**t, "splits": {"train": []}}, "splits.train must be an object"),
    "shards a string": (lambda t: _split(t, shards="train-000000.tar"), "splits.train.shards must be a list"),
    "a shard a number": (lambda t: _split(t, shards=[1, 2]), "splits.train.shards must be a list"),
    "bytes as text": (lambda t: _split(t, bytes=["1"] * 5), "splits.train.bytes must be a list of 5"),
    "bytes negative": (lambda t: _split(t, bytes=[-1] * 5), "splits.train.bytes must be a list of 5"),
    "bytes too few": (lambda t: _split(t, bytes=[1]), "splits.train.bytes must be a list of 5"),
    "samples floats": (lambda t: _split(t, samples=[1.5] * 5), "splits.train.samples must be a list"),
    "samples booleans": (lambda t: _split(t, samples=[True] * 5), "splits.train.samples must be a list"),
    "index a number": (lambda t: _split(t, index=3), "splits.train.index must be"),
    "digest not hex": (lambda t: _split(t, index_sha256="zz"), "splits.train.index_sha256 must be"),
    "an empty label": (lambda t: {**t, "labels": [*t["labels"], ""]}, "'labels': label 7 has an empty label name"),
    "default a list": (lambda t: {**t, "default": ["negative"]}, "'default' must be negative or unknown"),
    "not an object": (lambda t: [t], "must be a JSON object"),
}


def _split(tree, **fields):
    tree["splits"]["train"].update(fields)
    return tree


@pytest.mark.parametrize("case", [*LABELS_JSON_CASES, "deep nesting", "huge number"])
def test_every_field_of_labels_json_is_checked(copy, case):
    path = copy / "labels.json"
    tree = json.loads(path.read_text())
    if case == "deep nesting":
        text, message = json.dumps(tree)[:-1] + f', "extra": {_deep(100_000)}}}', "cannot read"
    elif case == "huge number":
        text, message = json.dumps(tree)[:-1] + f', "extra": {"9" * 5000}}}', "cannot read"
    else:
        change, message = LABELS_JSON_CASES[case]
        text = json.dumps(change(tree))
    path.write_text(text)
    with pytest.raises(DataError, match=rf"cannot read {path}: " if message == "cannot read" else rf"{path}.*{message}"):
        read_wds_table(copy, "train")


def test_malformed_headers_are_data_errors(server):
    def answer(status, headers, body=b""):
        def send(request):
            request.send_response(status)
            for key, value in headers:
                request.send_header(key, value)
            request.send_header("Connection", "close")
            request.end_headers()
            request.wfile.write(body)
            request.close_connection = True
        return send
    server.routes["/badloc/labels.json"] = answer(302, [("Location", "http://[::1/x")])
    server.routes["/hugelen/labels.json"] = answer(200, [("Content-Length", "9" * 5000)], b"{}")
    with pytest.raises(DataError, match=r"cannot fetch .*/badloc/labels.json: .*malformed URL"):
        read_vocabulary(f"{server.url}/badloc")
    with pytest.raises(DataError, match=r"hugelen/labels.json: 'labels': labels must be a non-empty list"):
        read_vocabulary(f"{server.url}/hugelen")


def test_a_member_that_is_no_image_is_named_by_shard_and_key_not_by_a_python_object():
    from mlabel.data.members import NamedBytes
    from mlabel.errors import DataError
    from mlabel.preprocess import read_rgb
    with pytest.raises(DataError) as caught:
        read_rgb(NamedBytes(b"not an image" * 8, "train-000000.tar#img7"))
    assert "cannot identify image file train-000000.tar#img7." in str(caught.value)
    assert "object at 0x" not in str(caught.value)
