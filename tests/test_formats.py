"""JSON lines, VOC and COCO readers, robust decoding, bad inputs and parser properties."""
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mlabel.data import DataError
from mlabel.data.__main__ import main as summary_main
from mlabel.data.formats import read_coco_table, read_jsonl_table, read_voc_table
from mlabel.data.tables import CsvColumns, read_csv_table
from mlabel.preprocess import read_rgb
from mlabel.train import main as train_main

from mlabel.data.synthetic import SCENE_LABELS, draw_scene


def _image(path, size=(16, 12), value=120):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)


def _voc(root, splits):
    """splits: {name: {image_id: [(label, difficult), ...]}}"""
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(exist_ok=True)
    for split, images in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in images))
        for image_id, objects in images.items():
            _image(root / "JPEGImages" / f"{image_id}.jpg")
            objs = "".join(f"<object><name>{n}</name><difficult>{int(d)}</difficult></object>" for n, d in objects)
            (root / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><filename>{image_id}.jpg</filename>{objs}</annotation>")


def test_jsonl_reads_positives_and_unknowns(tmp_path):
    for name in "abc":
        _image(tmp_path / f"{name}.png")
    (tmp_path / "t.jsonl").write_text('{"image": "a.png", "labels": ["cat"]}\n\n'
                                      '{"image": "b", "labels": ["dog", "cat"], "unknown": ["bird"]}\n'
                                      '{"image": "c.png", "labels": []}\n')
    table = read_jsonl_table(tmp_path / "t.jsonl", tmp_path)
    assert table.labels == ["bird", "cat", "dog"]
    np.testing.assert_array_equal(table.targets, [[0, 1, 0], [-1, 1, 1], [0, 0, 0]])
    assert table.paths[1].endswith("b.png")  # extension resolved


def test_voc_difficult_only_labels_are_unknown(tmp_path):
    _voc(tmp_path, {"train": {"1": [("cat", 0), ("dog", 1)], "2": [("dog", 0), ("dog", 1)], "3": []}})
    table = read_voc_table(tmp_path, "train")
    assert table.labels == ["cat", "dog"]
    np.testing.assert_array_equal(table.targets, [[1, -1], [0, 1], [0, 0]])


def test_coco_keeps_unannotated_images_and_uses_category_names(tmp_path):
    for name in ("x.jpg", "y.jpg", "z.jpg"):
        _image(tmp_path / "val2017" / name)
    coco = {"categories": [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}],
            "images": [{"id": 10, "file_name": "x.jpg"}, {"id": 11, "file_name": "y.jpg"},
                       {"id": 12, "file_name": "z.jpg"}],
            "annotations": [{"image_id": 10, "category_id": 1}, {"image_id": 10, "category_id": 1},
                            {"image_id": 11, "category_id": 3}]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    table = read_coco_table(tmp_path / "annotations" / "instances_val2017.json", tmp_path)
    assert table.labels == ["person", "car"]  # category-id order
    np.testing.assert_array_equal(table.targets, [[1, 0], [0, 1], [0, 0]])
    assert table.paths[0] == str(tmp_path / "val2017" / "x.jpg")


def _scene_images(root, n, seed):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        image, target = draw_scene(rng)
        image.save(root / f"s{seed}_{i}.png")
        items.append((f"s{seed}_{i}.png", [SCENE_LABELS[j] for j in np.flatnonzero(target)]))
    return items


def _quick_train(tmp_path, extra):
    out = tmp_path / "run"
    code = train_main(["quickstart", f"out_dir={out}", "model.backbone=test_resnet", "model.pretrained=false",
                       "data.generate=null", "data.image_size=32", "data.batch_size=16", "data.num_workers=0",
                       "train.epochs=1", "train.channels_last=false", "thresholds.cross_fit=0", "--quiet", *extra])
    assert code == 0
    return json.loads((out / "metrics.json").read_text()), out


@pytest.mark.parametrize("fmt", ["jsonl", "voc", "coco"])
def test_every_format_trains_end_to_end(tmp_path, fmt):
    images = tmp_path / "images"
    images.mkdir()
    train, val = _scene_images(images, 40, 0), _scene_images(images, 16, 1)
    if fmt == "jsonl":
        for name, items in (("train", train), ("val", val)):
            (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"image": f, "labels": l}) + "\n" for f, l in items))
        extra = ["data.format=jsonl", f"data.root={images}", f"data.train={tmp_path / 'train.jsonl'}",
                 f"data.val={tmp_path / 'val.jsonl'}"]
    elif fmt == "voc":
        voc = tmp_path / "VOC"
        (voc / "JPEGImages").mkdir(parents=True)
        _voc(voc, {})
        for name, items in (("train", train), ("val", val)):
            (voc / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{f[:-4]}\n" for f, _ in items))
            for f, labels in items:
                (voc / "JPEGImages" / f).write_bytes((images / f).read_bytes())
                objs = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in labels)
                (voc / "Annotations" / f"{f[:-4]}.xml").write_text(f"<annotation><filename>{f}</filename>{objs}</annotation>")
        extra = ["data.format=voc", f"data.root={voc}", "data.train=train", "data.val=val"]
    else:
        categories = [{"id": i + 1, "name": n} for i, n in enumerate(SCENE_LABELS)]
        for name, items in (("train", train), ("val", val)):
            coco = {"categories": categories,
                    "images": [{"id": i, "file_name": f} for i, (f, _) in enumerate(items)],
                    "annotations": [{"image_id": i, "category_id": SCENE_LABELS.index(n) + 1}
                                    for i, (_, labels) in enumerate(items) for n in labels]}
            (tmp_path / f"instances_{name}.json").write_text(json.dumps(coco))
        extra = ["data.format=coco", f"data.root={images}", f"data.train={tmp_path / 'instances_train.json'}",
                 f"data.val={tmp_path / 'instances_val.json'}"]
    metrics, out = _quick_train(tmp_path, extra + ["data.test=null"])
    assert metrics["val"]["n_images"] == 16 and 0 <= metrics["val"]["mAP"] <= 1
    run = json.loads((out / "run.json").read_text())
    assert run["label_counts"]["train"]["images"] == 40


@pytest.mark.parametrize("cached", [False, True])
def test_bad_images_are_all_listed_or_skipped_into_skipped_csv(tmp_path, scene_csv, capsys, monkeypatch, cached):
    import csv

    from mlabel.data import check
    if cached:  # building the cache is the check: no second decoding pass
        monkeypatch.setattr(check, "find_bad_images", lambda *a, **k: pytest.fail("decoded twice"))
    rows = list(csv.reader((scene_csv / "train.csv").open()))
    (tmp_path / "bad1.png").write_bytes(b"not a png")
    (tmp_path / "bad2.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rows += [[str(tmp_path / "bad1"), *rows[1][1:]], [str(tmp_path / "bad2.jpg"), *rows[2][1:]]]
    with (tmp_path / "train.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    common = ["quickstart", f"out_dir={tmp_path / 'r'}", "model.backbone=test_resnet", "model.pretrained=false",
              "data.generate=null", "data.image_size=32", "data.batch_size=16", "data.num_workers=0",
              "train.epochs=1", f"data.root={scene_csv}", f"data.train={tmp_path / 'train.csv'}",
              "data.val=val.csv", "data.test=null", "--quiet"]
    if cached:
        common += ["data.cache=true", f"data.cache_dir={tmp_path / 'cache'}"]
    assert train_main(common) == 2
    err = capsys.readouterr().err
    assert "2 images cannot be used" in err and "bad1.png" in err and "bad2.jpg" in err
    assert "data.on_bad_image=skip" in err and "Traceback" not in err
    if cached:  # the second run reads the problems recorded with the cache the first one built
        from mlabel.data.cache import DecodedCache
        monkeypatch.setattr(DecodedCache, "_build", lambda *a: pytest.fail("cache rebuilt"))
    assert train_main(common + ["data.on_bad_image=skip"]) == 0
    skipped = list(csv.DictReader((tmp_path / "r" / "skipped.csv").open()))
    assert {r["path"] for r in skipped} == {str(tmp_path / "bad1.png"), str(tmp_path / "bad2.jpg")}
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["label_counts"]["train"]["images"] == len(rows) - 3  # header and the two bad rows


def test_decoding_handles_modes_orientation_truncation_and_bombs(tmp_path, monkeypatch):
    sixteen = (np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "g16.png")
    rgb = read_rgb(tmp_path / "g16.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (30, 40, 3)
    np.testing.assert_array_equal(rgb[..., 0], np.round(sixteen / 65535 * 255).astype(np.uint8))
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert tuple(read_rgb(tmp_path / "c.jpg")[0, 0]) == pytest.approx((255, 0, 0), abs=3)
    Image.new("P", (8, 8), 3).save(tmp_path / "p.png")
    Image.new("LA", (8, 8), (90, 10)).save(tmp_path / "la.png")
    assert read_rgb(tmp_path / "p.png").shape == read_rgb(tmp_path / "la.png").shape == (8, 8, 3)
    assert tuple(read_rgb(tmp_path / "la.png")[0, 0]) == (90, 90, 90)
    wide = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = wide.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    wide.save(tmp_path / "rot.jpg", exif=exif)
    assert read_rgb(tmp_path / "rot.jpg").shape == (20, 10, 3)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "f.jpg")
    data = (tmp_path / "f.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.jpg.*truncated"):
        read_rgb(tmp_path / "t.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match="refused image .*f.jpg.*decompression bomb"):
        read_rgb(tmp_path / "f.jpg")


def _bad_csv(d):
    (d / "t.csv").write_text("img,a\nx.png,1\nx.png,maybe\n")
    return lambda: read_csv_table(d / "t.csv", d)


def _ragged_csv(d):
    (d / "t.csv").write_text("img,a,b\nx.png,1,0\nx.png,1\n")
    return lambda: read_csv_table(d / "t.csv", d)


def _missing_image_csv(d):
    (d / "t.csv").write_text("img,a\nnope.png,1\n")
    return lambda: read_csv_table(d / "t.csv", d)


def _jsonl(text):
    def setup(d):
        (d / "t.jsonl").write_text(text)
        return lambda: read_jsonl_table(d / "t.jsonl", d)
    return setup


def _voc_xml(text):
    def setup(d):
        _voc(d, {"train": {"1": []}})
        (d / "Annotations" / "1.xml").write_text(text)
        return lambda: read_voc_table(d, "train")
    return setup


def _coco(obj):
    def setup(d):
        (d / "i.json").write_text(obj if isinstance(obj, str) else json.dumps(obj))
        return lambda: read_coco_table(d / "i.json", d)
    return setup


def _val_label(d):
    (d / "v.jsonl").write_text('{"image": "x.png", "labels": ["moon"]}\n')
    return lambda: read_jsonl_table(d / "v.jsonl", d, labels=["sun"])


BAD_INPUTS = [
    ("csv: a label cell that is not 0/1/empty", _bad_csv, "t.csv:3: column 'a' has 'maybe'"),
    ("csv: a row with too few fields", _ragged_csv, "t.csv:3: 2 fields, the header has 3"),
    ("csv: an image that does not exist", _missing_image_csv, "1 of 1 images not found"),
    ("jsonl: broken JSON", _jsonl('{"image": "x.png", "labels": ["a"]}\n{"image": "x.png",\n'), "t.jsonl:2: not valid JSON"),
    ("jsonl: no image key", _jsonl('{"labels": ["a"]}\n'), 't.jsonl:1: expected an object with a non-empty string "image"'),
    ("jsonl: labels not a list", _jsonl('{"image": "x.png", "labels": "a"}\n'), 't.jsonl:1: "labels" must be a list'),
    ("jsonl: empty file", _jsonl("\n\n"), "holds no records"),
    ("jsonl: val label unknown to train", _val_label, "v.jsonl:1: label 'moon' is not in the training labels"),
    ("voc: malformed XML", _voc_xml("<annotation><object>"), "1.xml: malformed XML"),
    ("voc: object without a name", _voc_xml("<annotation><object><difficult>0</difficult></object></annotation>"),
     "1.xml: an <object> has no <name>"),
    ("voc: missing split file", lambda d: (lambda: read_voc_table(d, "trainval")), "VOC split file"),
    ("coco: not JSON", _coco("{images: []"), "i.json: not valid JSON"),
    ("coco: no categories", _coco({"images": []}), 'expected a COCO object with "images" and "categories"'),
    ("coco: annotation of an unknown image", _coco({"categories": [{"id": 1, "name": "a"}],
                                                    "images": [{"id": 1, "file_name": "x.png"}],
                                                    "annotations": [{"image_id": 7, "category_id": 1}]}),
     "refers to image id 7"),
    ("coco: image without file_name", _coco({"categories": [], "images": [{"id": 1}]}), "lacks a valid field"),
]


@pytest.mark.parametrize("case,setup,fragment", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_table(tmp_path, case, setup, fragment):
    _image(tmp_path / "x.png")
    with pytest.raises(DataError) as info:
        setup(tmp_path)()
    assert fragment in str(info.value), case


# ----------------------------------------------------------------- property-based parser tests

PROPERTY = settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
NAMES = st.sampled_from(["cat", "dog", "bird", "", "a b", "x,y", 'q"', "é"])
CELLS = st.one_of(st.sampled_from(["0", "1", "", "-1", "yes", "2", "nan", " 1 "]), st.text(max_size=4))


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    for name in ("a.png", "b.png", "c.jpg"):
        _image(root / name)
    return root


def _only_data_errors(call):
    try:
        table = call()
    except DataError:
        return None
    assert table.targets.shape == (len(table.paths), len(table.labels))
    assert set(np.unique(table.targets)) <= {-1.0, 0.0, 1.0}
    return table


@PROPERTY
@given(header=st.lists(st.sampled_from(["img", "a", "b", "tags", "c"]), min_size=1, max_size=4),
       rows=st.lists(st.lists(st.one_of(st.sampled_from(["a.png", "b", "c.jpg", "zz.png"]), CELLS),
                              max_size=5), max_size=6),
       names_column=st.booleans())
def test_csv_parser_raises_only_data_errors(pool, tmp_path_factory, header, rows, names_column):
    import csv
    path = tmp_path_factory.mktemp("csv") / "t.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    columns = CsvColumns(joined="tags" if names_column and "tags" in header else None)
    _only_data_errors(lambda: read_csv_table(path, pool, columns=columns))


@PROPERTY
@given(lines=st.lists(st.one_of(
    st.fixed_dictionaries({"image": st.sampled_from(["a.png", "b", "c.jpg", "zz.png", ""]),
                           "labels": st.one_of(st.lists(NAMES, max_size=3), NAMES, st.integers())},
                          optional={"unknown": st.lists(NAMES, max_size=2)}).map(json.dumps),
    st.text(max_size=20)), max_size=6))
def test_jsonl_parser_raises_only_data_errors(pool, tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("jsonl") / "t.jsonl"
    path.write_text("\n".join(lines))
    _only_data_errors(lambda: read_jsonl_table(path, pool))


@PROPERTY
@given(objects=st.lists(st.tuples(NAMES, st.sampled_from(["0", "1", "", "x"])), max_size=4),
       noise=st.sampled_from(["", "<", "</annotation>", "<object>", "&"]), filename=st.sampled_from(["a.png", "zz.png", ""]),
       box=st.sampled_from(["", "<bndbox><xmin>3</xmin><ymin>x</ymin></bndbox>", "<bndbox><xmin>1</xmin><ymin>2</ymin>"
                            "<xmax>4</xmax><ymax>5</ymax></bndbox>", "<bndbox><xmin>9</xmin><ymin>2</ymin><xmax>4</xmax>"
                            "<ymax>5</ymax></bndbox>", "<bndbox><xmin>nan</xmin></bndbox>"]))
def test_voc_parser_raises_only_data_errors(pool, tmp_path_factory, objects, noise, filename, box):
    root = tmp_path_factory.mktemp("voc")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "JPEGImages").symlink_to(pool)
    (root / "ImageSets" / "Main" / "train.txt").write_text("1\n")
    objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult>{box}</object>" for n, d in objects)
    (root / "Annotations" / "1.xml").write_text(f"<annotation><filename>{filename}</filename>{objs}{noise}</annotation>")
    _only_data_errors(lambda: read_voc_table(root, "train"))


@PROPERTY
@given(categories=st.lists(st.fixed_dictionaries({"id": st.one_of(st.integers(0, 3), st.text(max_size=2)),
                                                  "name": NAMES}), max_size=3),
       images=st.lists(st.fixed_dictionaries({"id": st.integers(0, 3),
                                              "file_name": st.sampled_from(["a.png", "c.jpg", "zz.png"])}), max_size=3),
       annotations=st.lists(st.fixed_dictionaries({"image_id": st.integers(0, 4),
                                                   "category_id": st.one_of(st.integers(0, 4), st.none())}), max_size=4),
       drop=st.sampled_from([None, "images", "categories", "annotations"]))
def test_coco_parser_raises_only_data_errors(pool, tmp_path_factory, categories, images, annotations, drop):
    data = {"categories": categories, "images": images, "annotations": annotations}
    if drop:
        data.pop(drop)
    path = tmp_path_factory.mktemp("coco") / "instances_x.json"
    path.write_text(json.dumps(data))
    _only_data_errors(lambda: read_coco_table(path, pool))


def test_summary_command_writes_json_and_chart(tmp_path, scene_csv, capsys):
    out = tmp_path / "summary"
    assert summary_main(["quickstart", f"data.root={scene_csv}", "data.generate=null", "data.val=val.csv",
                         "data.test=null", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total_images"] == 72 and summary["images"] == {"train": 48, "val": 24}
    assert (out / "summary.png").stat().st_size > 10_000
    train = read_csv_table(scene_csv / "train.csv", scene_csv)
    val = read_csv_table(scene_csv / "val.csv", scene_csv)
    targets = np.concatenate([train.targets, val.targets])
    assert summary["label_cardinality"] == pytest.approx(targets.sum(1).mean())
    top = summary["top_cooccurring_pairs"][0]
    a, b = (train.labels.index(n) for n in top["labels"])
    assert top["images"] == int(((targets[:, a] == 1) & (targets[:, b] == 1)).sum())
    assert "label cardinality" in capsys.readouterr().out


def test_augment_presets_and_explicit_lists(tmp_path, capsys):
    from mlabel.config import load_config
    from mlabel.data import build_transform
    pre = {"image_size": 24, "resize": "crop", "crop_pct": 0.875, "interpolation": "bilinear",
           "mean": [0.5] * 3, "std": [0.25] * 3}
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    for augment in ("light", "flips", "medium", "strong",
                    [{"name": "HorizontalFlip", "p": 1.0}, {"name": "ColorJitter", "brightness": 0.2}]):
        out = build_transform(pre, True, augment)(image=image)["image"]
        assert tuple(out.shape) == (3, 24, 24) and out.dtype.is_floating_point
    flipped = build_transform(pre, True, [{"name": "HorizontalFlip", "p": 1.0}])(image=image)["image"]
    plain = build_transform(dict(pre, resize="squish"), False)(image=image[:, ::-1].copy())["image"]
    assert float((flipped - plain).abs().max()) < 0.05  # flip, then resize: the mirrored image
    cfg = load_config("quickstart", ["data.augment=[{name: HorizontalFlip, p: 0.5}]"])
    assert cfg.data.augment == [{"name": "HorizontalFlip", "p": 0.5}]
    with pytest.raises(DataError, match=r"augment\[0\]: 'Flipz' is not an albumentations transform"):
        build_transform(pre, True, [{"name": "Flipz"}])
    with pytest.raises(DataError, match=r"augment\[0\] \(HorizontalFlip\)"):
        build_transform(pre, True, [{"name": "HorizontalFlip", "nonsense": 1}])
