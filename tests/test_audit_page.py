"""audit.html without a browser: the page parses, holds every tile's data (thumbnails byte for
byte) in rank order, escapes hostile names, is written atomically, refuses bad tiles, and its size
per tile is measured (the browser half is in tests/test_browser.py)."""
from __future__ import annotations

import base64
import io
import json
import os
import shlex
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlabel.audit.page import KINDS, Tile, write_audit_page
from mlabel.data.synthetic import draw_scene

LABELS = ["circle", "square", "triangle", "cross", "ring", "star"]
HOSTILE_LABEL = '</script><script>alert("x")</script><!-- & \'q\''
POOL = 200
HOSTILE_IMAGE = 'images/<img src=x onerror=alert(1)>,"a, b"\nline2</script>'


def jpeg(rng: np.random.Generator, size: int = 96, quality: int = 70) -> bytes:
    """A generated scene as the audit's thumbnails are: a 96-px JPEG at quality 70."""
    image, _ = draw_scene(rng, size)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_tiles(n: int, labels=LABELS, seed: int = 0, images: list[str] | None = None) -> list[Tile]:
    """``n`` tiles with random cells, ranks 1..n in a shuffled order, one thumbnail per image.

    The thumbnails are :data:`POOL` drawn scenes, the k-th image's made distinct by k's bytes
    after the JPEG's end (which decoders ignore), so thousands of tiles cost no thousands of drawings."""
    rng = np.random.default_rng(seed)
    images = images or [f"images/train{i}.png" for i in range(n)]
    pool = [jpeg(rng) for _ in range(min(POOL, len(images)))]
    thumbs = [pool[k % POOL] + k.to_bytes(4, "big") for k in range(len(images))]
    tiles = []
    for rank, i in enumerate(rng.permutation(n), 1):
        image = images[i % len(images)]
        label = labels[(i // len(images) + i % len(images)) % len(labels)]  # an image's cells differ
        kind = KINDS[i % len(KINDS)]
        state = rng.integers(-1, 2, len(labels))
        state[labels.index(label)] = {"missing": 0, "spurious": 1}.get(kind, -1)
        tiles.append(Tile(image=image, thumbnail=thumbs[i % len(images)],
                          given=[n_ for n_, s in zip(labels, state) if s == 1],
                          unknown=[n_ for n_, s in zip(labels, state) if s == -1],
                          predicted=[n_ for n_ in labels if rng.random() < 0.4], label=label, kind=kind,
                          probability=float(rng.random()), score=float(n - rank) / n, rank=rank))
    return [tiles[k] for k in rng.permutation(n)]


VOID = {"meta", "br", "img", "input", "hr", "link"}


class Page(HTMLParser):
    """Every start tag, the text of every element by tag, and the script blocks by id; every
    element is closed where it was opened (a stray name cannot end one early)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.scripts, self.text, self.stack = [], {}, {}, []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append((tag, dict(attrs).get("id")))

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1][0] == tag, (tag, self.stack[-3:])
        self.stack.pop()

    def handle_data(self, data):
        if self.stack:
            tag, ident = self.stack[-1]
            self.text.setdefault(tag, []).append(data)
            if tag == "script":
                self.scripts[ident] = self.scripts.get(ident, "") + data


def read_page(path: Path) -> tuple[Page, dict]:
    page = Page(path.read_text(encoding="utf-8"))
    assert page.stack == []
    return page, json.loads(page.scripts["audit-data"])


def test_the_page_holds_every_tile_in_rank_order(tmp_path):
    tiles = make_tiles(40, images=[f"img{i}.jpg" for i in range(25)])  # 15 images shown for two labels
    path = tmp_path / "audit" / "audit.html"
    size = write_audit_page(path, tiles, LABELS, "audit of scenes")
    assert size == path.stat().st_size
    page, data = read_page(path)
    assert [t for t, _ in page.tags if t == "script"] == ["script", "script"]  # the data and page.js, nothing else
    assert not any(attrs.get("src") for _, attrs in page.tags)  # nothing fetched: no external script, image or font
    assert data["labels"] == LABELS
    assert [row["rank"] for row in data["tiles"]] == list(range(1, 41))
    assert len(data["thumbs"]) == 25  # one per distinct thumbnail
    for row, tile in zip(data["tiles"], sorted(tiles, key=lambda t: t.rank)):
        assert row["image"] == tile.image and LABELS[row["label"]] == tile.label and row["kind"] == tile.kind
        assert [LABELS[j] for j in row["given"]] == tile.given
        assert [LABELS[j] for j in row["unknown"]] == tile.unknown
        assert [LABELS[j] for j in row["predicted"]] == tile.predicted
        assert (row["probability"], row["score"]) == (tile.probability, tile.score)
        expected = 1 if tile.label in tile.given else -1 if tile.label in tile.unknown else 0
        assert row["given_value"] == expected == {"missing": 0, "spurious": 1}.get(tile.kind, -1)
        prefix = "data:image/jpeg;base64,"
        assert data["thumbs"][row["thumb"]].startswith(prefix)
        assert base64.b64decode(data["thumbs"][row["thumb"]][len(prefix):]) == tile.thumbnail
    assert shlex.split(data["apply"]) == ["mlabel", "audit", "apply", str(path.parent), "corrections.csv", "--out",
                                          "NEW_LABELS"]


def test_equal_ranks_keep_the_callers_order_and_a_missing_thumbnail_is_none(tmp_path):
    base = make_tiles(3)
    tiles = [Tile(**{**vars(t), "rank": 1, "thumbnail": b"" if k == 1 else t.thumbnail}) for k, t in enumerate(base)]
    write_audit_page(tmp_path / "a.html", tiles, LABELS, "t")
    _, data = read_page(tmp_path / "a.html")
    assert [row["image"] for row in data["tiles"]] == [t.image for t in tiles]
    assert [row["thumb"] is None for row in data["tiles"]] == [False, True, False]


def test_hostile_names_and_title_stay_text(tmp_path):
    labels = [*LABELS[:-1], HOSTILE_LABEL]
    tiles = make_tiles(12, labels=labels, images=[HOSTILE_IMAGE, "plain.png", "a,b\"c"])
    title = '<script>alert(1)</script> "audit" & co'
    path = tmp_path / "audit.html"
    write_audit_page(path, tiles, labels, title)
    text = path.read_text(encoding="utf-8")
    assert HOSTILE_LABEL not in text and "<img src=x" not in text and "<script>alert" not in text
    page, data = read_page(path)
    assert [t for t, _ in page.tags if t in ("script", "img")] == ["script", "script"]
    assert "".join(page.text["title"]) == title == "".join(page.text["h1"])
    assert data["labels"] == labels and data["title"] == title
    assert {row["image"] for row in data["tiles"]} == {HOSTILE_IMAGE, "plain.png", "a,b\"c"}
    assert any(labels[row["label"]] == HOSTILE_LABEL for row in data["tiles"])


def test_the_page_is_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "audit.html"
    write_audit_page(path, make_tiles(5), LABELS, "first")
    before = path.read_bytes()

    def torn(self, data):  # a writer killed half way through the page
        with open(self, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError("disk full")
    monkeypatch.setattr(Path, "write_bytes", torn)
    with pytest.raises(OSError, match="disk full"):
        write_audit_page(path, make_tiles(9, seed=1), LABELS, "second")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["audit.html"]  # no temporary file left


@pytest.mark.parametrize("change, message", [
    ({"label": "cat"}, "label 'cat', which is not among the 6 labels"),
    ({"predicted": ["circle", "dog"]}, "label 'dog'"),
    ({"kind": "wrong"}, "kind 'wrong'; expected one of missing, spurious"),
    ({"probability": float("nan")}, "must be finite"),
    ({"score": float("inf")}, "must be finite"),
])
def test_bad_tiles_are_refused_and_nothing_is_written(tmp_path, change, message):
    tiles = make_tiles(4)
    tiles[2] = Tile(**{**vars(tiles[2]), **change})
    with pytest.raises(ValueError, match=message):
        write_audit_page(tmp_path / "audit.html", tiles, LABELS, "t")
    assert os.listdir(tmp_path) == []


def test_a_repeated_cell_or_label_is_refused(tmp_path):
    tiles = make_tiles(4)
    with pytest.raises(ValueError, match="two tiles are about image"):
        write_audit_page(tmp_path / "a.html", [*tiles, Tile(**{**vars(tiles[0]), "rank": 9})], LABELS, "t")
    with pytest.raises(ValueError, match=r"repeat \['ring'\]"):
        write_audit_page(tmp_path / "a.html", tiles, [*LABELS, "ring"], "t")
    assert os.listdir(tmp_path) == []


def test_the_page_size_grows_by_the_thumbnails_and_a_little_per_tile(tmp_path):
    """Measured: 2,000 tiles of 96-px JPEG thumbnails at quality 70, each tile its own image."""
    n = 2000
    tiles = make_tiles(n)
    size = write_audit_page(tmp_path / "big.html", tiles, LABELS, "size")
    small = write_audit_page(tmp_path / "small.html", tiles[:100], LABELS, "size")
    thumbs = sum(len(t.thumbnail) for t in tiles)
    base64_bytes = sum(4 * -(-len(t.thumbnail) // 3) + 23 for t in tiles)  # with the data URI prefix
    per_tile = (size - small - sum(4 * -(-len(t.thumbnail) // 3) + 23 for t in tiles[100:])) / (n - 100)
    print(f"\n{n} tiles: page {size / 1e6:.2f} MB; thumbnails {thumbs / 1e6:.2f} MB as JPEG, "
          f"{base64_bytes / 1e6:.2f} MB in base64; {per_tile:.0f} bytes of other data per tile")
    assert 100 < per_tile < 400
    assert size < base64_bytes + 400 * n + 30_000
    # the same 2,000 cells on 500 images: each thumbnail is embedded once
    shared = write_audit_page(tmp_path / "shared.html", make_tiles(n, images=[f"i{k}" for k in range(500)]), LABELS, "s")
    assert shared < size / 3
