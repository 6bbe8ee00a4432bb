"""WebDataset shards (issue 19): written from any format, read back, streamed across ranks and
loader workers exactly once, resumable writing, and clear errors for broken shards."""
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mlabel.data import DataError, build_splits
from mlabel.data.__main__ import main as data_main
from mlabel.data.shards import (ShardLoader, ShardStream, StreamOptions, expand_braces, read_member, read_wds_table,
                                stream_plan,
                                write_shards)
from mlabel.config import load_config
from mlabel.preprocess import read_rgb

SCENES = ["data.generate=null", "data.val=val.csv", "data.test=null"]


def scene_splits(scene_csv):
    return build_splits(load_config("quickstart", [f"data.root={scene_csv}", *SCENES]).data, "auto", 0)


@pytest.fixture(scope="module")
def shards(scene_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "s"
    assert data_main(["shard", "quickstart", f"data.root={scene_csv}", *SCENES, "--out", str(out),
                      "--shard-size", "10"]) == 0
    return out


def test_expand_braces():
    assert expand_braces("a-{008..011}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar", "a-011.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_shards_hold_the_splits_as_read_from_csv(shards, scene_csv):
    splits = scene_splits(scene_csv)
    vocabulary = json.loads((shards / "labels.json").read_text())
    assert vocabulary["labels"] == splits.labels
    assert vocabulary["splits"]["train"]["samples"] == [10, 10, 10, 10, 8]
    for name in ("train", "val"):
        table, source = read_wds_table(shards, name), getattr(splits, name)
        assert table.labels == source.labels
        assert table.sparse  # index lists, dense rows only per batch
        np.testing.assert_array_equal(table.dense_targets(), source.targets)
        np.testing.assert_array_equal(table.model_targets([1, 0]).labels.numpy(), source.targets[[1, 0]])
        for row in (0, len(table) - 1):  # the same pixels: the bytes are the source file's
            np.testing.assert_array_equal(table.read_image(row), read_rgb(source.paths[row]))
    # a brace pattern names the same shards as the split name
    by_pattern = read_wds_table(shards, "train-{000000..000004}.tar")
    np.testing.assert_array_equal(by_pattern.dense_targets(), splits.train.targets)
    # data.labels: a subset in another order
    picked = read_wds_table(shards, "val", labels=["star", "circle"])
    np.testing.assert_array_equal(picked.dense_targets(), splits.val.targets[:, [5, 0]])


def test_webdataset_reads_our_shards(shards):
    wds = pytest.importorskip("webdataset")
    keys = [(s["__key__"], json.loads(s["json"])["labels"]) for s in wds.WebDataset(str(shards / "val-000000.tar"),
                                                                                   shardshuffle=False)]
    table = read_wds_table(shards, "val")
    assert [k for k, _ in keys] == [p.split("#")[1] for p in table.paths[:10]]
    assert [sorted(names) for _, names in keys] == [sorted(n for n, t in zip(table.labels, row) if t == 1)
                                                     for row in table.dense_targets()[:10]]


def test_interrupted_writing_resumes_to_the_same_bytes(scene_csv, tmp_path, shards):
    splits = scene_splits(scene_csv)
    calls = {"n": 0}

    def dies_on_the_25th(path):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt  # as a kill: the shard being written is left as a temporary file
        return None
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        write_shards(splits, out, 10, Path(scene_csv).resolve(), check=dies_on_the_25th, log=lambda *a: None)
    assert not (out / "labels.json").exists() and (out / "train-000001.tar").is_file()
    assert not (out / "train-000002.tar").exists()
    before = (out / "train-000000.tar").stat().st_mtime_ns
    written = []
    write_shards(splits, out, 10, Path(scene_csv).resolve(), log=written.append)
    assert (out / "train-000000.tar").stat().st_mtime_ns == before  # finished shards are not rewritten
    assert not any("train-000000" in line or "train-000001" in line for line in written)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in shards.iterdir())  # no temporary or progress file left
    for name in names:
        if name.endswith(".tar"):
            assert (out / name).read_bytes() == (shards / name).read_bytes(), name


def test_refuses_a_folder_of_other_shards(scene_csv, tmp_path, shards):
    splits = scene_splits(scene_csv)
    out = tmp_path / "s"
    write_shards(splits, out, 10, Path(scene_csv).resolve(), log=lambda *a: None)
    with pytest.raises(DataError, match="another source"):
        write_shards(splits, out, 7, Path(scene_csv).resolve(), log=lambda *a: None)
    # and into the data folder: refused, nothing written
    assert data_main(["shard", "quickstart", f"data.root={scene_csv}", *SCENES, "--out", str(scene_csv / "s")]) == 2
    assert not (scene_csv / "s").exists()


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12), world=st.integers(1, 4),
       workers=st.integers(1, 4), batch=st.integers(1, 16), seed=st.integers(0, 1000))
def test_plan_covers_every_sample_once_with_equal_steps(sizes, world, workers, batch, seed):
    order = np.random.default_rng(seed).permutation(len(sizes))
    total = sum(sizes)
    if total < world:
        with pytest.raises(DataError, match="cannot feed"):
            stream_plan(sizes, order, batch, 0, world, 0, workers)
        return
    seen, steps = np.zeros(total, int), set()
    for rank in range(world):
        batches = 0
        for worker in range(workers):
            first, stop, own, every = stream_plan(sizes, order, batch, rank, world, worker, workers)
            seen[first:stop] += 1
            largest = batch if -(-total // world) <= batch * (total // world) else batch + 1
            assert sum(own) == stop - first and all(0 < b <= largest for b in own)
            batches += len(own)
            steps.add(every)
        assert batches == every  # each rank takes the same number of steps
    assert len(steps) == 1
    np.testing.assert_array_equal(seen, 1)


class RowStream(ShardStream):
    """Batches of table rows (what each rank and worker reads), images still decoded."""

    def sample(self, row, position, image):
        return row, position


def rows_collate(samples):
    return [r for r, _ in samples], [p for _, p in samples]


def _epoch_rows(shards, rank, world, workers, seed=0, skip=0, batch=4):
    table = read_wds_table(shards, "train")
    stream = RowStream(table, None, batch, options=StreamOptions(rank=rank, world=world, shuffle_buffer=8),
                       collate=rows_collate)
    loader = ShardLoader(stream, num_workers=workers, seed=seed)
    stream.skip_steps = skip
    return [b for b in loader], len(loader)


def _ddp_rank(rank, world, shards, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batches, steps = _epoch_rows(shards, rank, world, workers=2)
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, (batches, steps))
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_with_two_workers_read_every_key_once(shards, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ranks.json"
    torch.multiprocessing.spawn(_ddp_rank, args=(2, shards, port, str(out)), nprocs=2)
    per_rank = json.loads(out.read_text())
    rows = [r for batches, _ in per_rank for rows, _ in batches for r in rows]
    assert sorted(rows) == list(range(48))  # every sample once across ranks and workers
    assert [len(batches) for batches, _ in per_rank] == [steps for _, steps in per_rank] == [6, 6]
    single, steps = _epoch_rows(shards, 0, 1, workers=2)
    assert sorted(r for rows, _ in single for r in rows) == list(range(48)) and len(single) == steps == 12


def test_stream_is_seeded_and_resumes_inside_an_epoch(shards):
    first, _ = _epoch_rows(shards, 0, 1, workers=2, seed=3)
    again, _ = _epoch_rows(shards, 0, 1, workers=2, seed=3)
    other, _ = _epoch_rows(shards, 0, 1, workers=2, seed=4)
    assert first == again and first != other
    resumed, _ = _epoch_rows(shards, 0, 1, workers=2, seed=3, skip=5)
    assert resumed == first[5:]  # the same batches, the same augmentation seeds (positions)
    # the buffer mixes samples of different shards within a batch, not only shard by shard
    assert any(len({r // 10 for r in rows}) > 1 for rows, _ in first)


def _rewrite(src: Path, dst: Path, change) -> None:
    """Copy a shard member by member, ``change(name, data)`` -> (name, data) or None to drop."""
    with tarfile.open(src) as tar, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as new:
        for info in tar:
            kept = change(info.name, tar.extractfile(info).read())
            if kept is not None:
                member = tarfile.TarInfo(kept[0])
                member.size = len(kept[1])
                new.addfile(member, io.BytesIO(kept[1]))


@pytest.fixture
def broken(shards, tmp_path):
    out = tmp_path / "broken"
    out.mkdir()
    for path in shards.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    return out


def test_truncated_shard_names_the_shard(broken):
    data = (broken / "train-000002.tar").read_bytes()
    (broken / "train-000002.tar").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"train-000002.tar: truncated inside sample 00000002\d"):
        read_wds_table(broken, "train")
    skipped = []
    table = read_wds_table(broken, "train", skip_bad=True, skipped=skipped)
    assert 40 <= len(table) < 48 and len(skipped) == 1 and "train-000002.tar" in skipped[0][1]


def test_sample_without_json_or_with_a_foreign_label(broken):
    _rewrite(broken / "train-000001.tar", broken / "t.tar",
             lambda n, d: None if n == "000000013.json" else
             (n, json.dumps({"labels": ["unicorn"]}).encode()) if n == "000000015.json" else (n, d))
    os.replace(broken / "t.tar", broken / "train-000001.tar")
    with pytest.raises(DataError) as err:
        read_wds_table(broken, "train")
    assert "train-000001.tar#000000013: sample 000000013 has no .json member" in str(err.value)
    assert "label 'unicorn' is not in the vocabulary" in str(err.value) and "#000000015" in str(err.value)
    skipped = []
    assert len(read_wds_table(broken, "train", skip_bad=True, skipped=skipped)) == 46 and len(skipped) == 2


def test_undecodable_image_in_the_stream(broken):
    _rewrite(broken / "train-000000.tar", broken / "t.tar",
             lambda n, d: (n, b"not an image" + d[:20]) if n == "000000004.png" else (n, d))
    os.replace(broken / "t.tar", broken / "train-000000.tar")
    table = read_wds_table(broken, "train")  # the scan reads labels, not pixels
    with pytest.raises(DataError, match=r"cannot read image .*train-000000.tar#000000004"):
        read_member(table.members[4], table.paths[4])
    stream = RowStream(table, None, 4, collate=rows_collate)
    with pytest.raises(DataError, match=r"train-000000.tar#000000004.*on_bad_image=skip"):
        list(ShardLoader(stream, num_workers=2, seed=0))
    stream = RowStream(table, None, 4, collate=rows_collate, options=StreamOptions(skip_bad=True))
    loader = ShardLoader(stream, num_workers=2, seed=0)
    rows = sorted(r for rows, _ in loader for r in rows)
    assert rows == [r for r in range(48) if r != 4] and [p for p, _ in loader.skipped] == [table.paths[4]]


def test_train_on_shards_end_to_end(shards, tmp_path):
    from mlabel.train import main as train_main
    run = tmp_path / "run"
    assert train_main(["quickstart", f"out_dir={run}", "data.format=wds", f"data.root={shards}", "data.train=train",
                       "data.val=val", "data.test=null", "data.generate=null", "model.backbone=test_resnet",
                       "model.pretrained=false", "data.image_size=32", "data.num_workers=2", "thresholds.cross_fit=0",
                       "thresholds.bootstrap=0", "train.epochs=1", "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["mAP"] > 0
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 2
    page = (run / "report" / "report.html").read_text()  # the galleries show images from inside the shards
    assert "data:image/jpeg" in page and "image not readable" not in page
    # batched tensor augmentation of whole batches (uint8 crops in the workers, the rest here)
    assert train_main(["quickstart", f"out_dir={tmp_path / 'device'}", "data.format=wds", f"data.root={shards}",
                       "data.train=train", "data.val=val", "data.test=null", "data.generate=null",
                       "model.backbone=test_resnet", "model.pretrained=false", "data.image_size=32",
                       "data.num_workers=2", "thresholds.cross_fit=0", "thresholds.bootstrap=0", "train.epochs=1",
                       "data.augment_on=device", "data.augment=light", "--quiet"]) == 0
    rows = list(__import__("csv").DictReader((tmp_path / "device" / "history.csv").open()))
    assert rows[0]["train_images"] == "48"
    # a recipe asking what shards cannot do is refused before anything is written
    assert train_main(["quickstart", f"out_dir={tmp_path / 'r2'}", "data.format=wds", f"data.root={shards}",
                       "data.train=train", "data.val=val", "data.test=null", "data.generate=null",
                       "data.cache=true", "--quiet"]) == 2
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("source", ["wds", "files"])
def test_resume_inside_an_epoch_repeats_the_run(shards, scene_csv, tmp_path, monkeypatch, source):
    """Killed just after a checkpoint at step 4 of epoch 2 (train.checkpoint_every_steps=2) and
    resumed: the epoch continues at step 5 with the batches it would have had, and the run ends
    as the uninterrupted one."""
    from mlabel import loop
    from mlabel.train import main as train_main
    data = (["data.format=wds", f"data.root={shards}", "data.train=train", "data.val=val"] if source == "wds" else
            [f"data.root={scene_csv}", "data.val=val.csv", "data.cache=false"])

    def argv(out, *extra):
        return ["quickstart", f"out_dir={out}", *data, "data.test=null", "data.generate=null", "data.batch_size=4",
                "model.backbone=test_resnet", "model.pretrained=false", "data.image_size=32", "data.num_workers=2",
                "thresholds.cross_fit=0", "thresholds.bootstrap=0", "train.epochs=2", "data.augment=light",
                "train.checkpoint_every_steps=2", "train.precision=fp32", "--quiet", *extra]

    assert train_main(argv(tmp_path / "straight")) == 0
    real = loop.save_checkpoint

    def killed_after(path, state):
        real(path, state)
        if state["train_state"].get("in_epoch", {}).get("step") == 4 and state["train_state"]["epoch"] == 1:
            raise RuntimeError("killed")

    monkeypatch.setattr(loop, "save_checkpoint", killed_after)
    with pytest.raises(RuntimeError, match="killed"):
        train_main(argv(tmp_path / "resumed", "--debug"))
    monkeypatch.setattr(loop, "save_checkpoint", real)
    assert train_main(argv(tmp_path / "resumed", "resume=true")) == 0
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "resumed"))
    for key in ("mAP", "macro_f1", "micro_f1", "macro_auroc"):
        assert a["val"][key] == pytest.approx(b["val"][key], abs=1e-12), key
    import csv as _csv
    rows = [list(_csv.DictReader((tmp_path / d / "history.csv").open())) for d in ("straight", "resumed")]
    for x, y in zip(*rows):
        assert x["train_images"] == y["train_images"] == "48"
        assert float(x["train_loss"]) == pytest.approx(float(y["train_loss"]), rel=1e-9)
        assert x["val_mAP"] == y["val_mAP"]


def test_training_skips_and_lists_an_undecodable_image(broken, tmp_path):
    from mlabel.train import main as train_main
    _rewrite(broken / "train-000000.tar", broken / "t.tar",
             lambda n, d: (n, b"not an image") if n == "000000004.png" else (n, d))
    os.replace(broken / "t.tar", broken / "train-000000.tar")
    argv = ["quickstart", "data.format=wds", f"data.root={broken}", "data.train=train", "data.val=val",
            "data.test=null", "data.generate=null", "model.backbone=test_resnet", "model.pretrained=false",
            "data.image_size=32", "data.num_workers=2", "thresholds.cross_fit=0", "thresholds.bootstrap=0",
            "train.epochs=2", "--quiet"]
    assert train_main([*argv, f"out_dir={tmp_path / 'stops'}"]) == 2
    assert train_main([*argv, f"out_dir={tmp_path / 'skips'}", "data.on_bad_image=skip"]) == 0
    listed = (tmp_path / "skips" / "skipped.csv").read_text().splitlines()
    assert listed[0] == "split,path,reason" and len(listed) == 2
    assert listed[1].startswith(f"train,{broken / 'train-000000.tar'}#000000004,")
    rows = list(__import__("csv").DictReader((tmp_path / "skips" / "history.csv").open()))
    assert [r["train_images"] for r in rows] == ["47", "47"]


def test_summary_of_the_shards_equals_the_csv_summary(shards, scene_csv, tmp_path):
    """mlabel.data's figures come from the label lists: the same on the shards as on the CSV."""
    for name, args in (("csv", [f"data.root={scene_csv}", *SCENES]),
                       ("wds", ["data.format=wds", f"data.root={shards}", "data.train=train", "data.val=val",
                                "data.test=null", "data.generate=null"])):
        assert data_main(["quickstart", *args, "--out", str(tmp_path / name)]) == 0
    a, b = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("csv", "wds"))
    assert a == b and a["top_cooccurring_pairs"] and a["distinct_label_sets"] > 5


def _train_streamed(shards, run, *extra):
    """A tiny run on the shards with streaming evaluation."""
    from mlabel.train import main as train_main
    assert train_main(["quickstart", f"out_dir={run}", "data.format=wds", f"data.root={shards}", "data.train=train",
                       "data.val=val", "data.test=null", "data.generate=null", "model.backbone=test_resnet",
                       "model.pretrained=false", "data.image_size=32", "thresholds.streaming=true", "--quiet",
                       *extra]) == 0
    return json.loads((run / "metrics.json").read_text())["val"]


def test_streaming_evaluation_end_to_end_matches_an_exact_evaluation(shards, tmp_path):
    """thresholds.streaming=true: thresholds from the val histograms, metrics without the (N, L)
    scores; an exact evaluation of the saved model on val gives the same cut-off figures."""
    from mlabel.evaluate import main as evaluate_main
    run = tmp_path / "run"
    streamed = _train_streamed(shards, run, "data.num_workers=2", "train.epochs=2")
    assert streamed["streaming"]["bins"] == 2048 and streamed["threshold_policy"]["policy"] == "histogram"
    assert streamed["calibration"] == "platt" and streamed["macro_ece_uncalibrated"] is not None
    assert not (run / "predictions").exists() and not (run / "report").exists()
    assert evaluate_main([str(run), "thresholds.streaming=false", "--split", "val", "--out", str(tmp_path / "exact.json"),
                          "--quiet"]) == 0
    exact = json.loads((tmp_path / "exact.json").read_text())["val"]
    for key in ("macro_f1", "micro_f1", "samples_f1", "hamming_loss", "subset_accuracy", "macro_f1@0.5"):
        assert streamed[key] == pytest.approx(exact[key], abs=1e-9), key
    # the ranking figures are the histograms' (this barely trained model's scores crowd into a few
    # bins, so they differ from the exact ones here): the same as the histograms of the exact scores
    from mlabel import load
    from mlabel.config import load_config
    from mlabel.evaluation import split_outputs
    from mlabel.streaming import histogram_metrics
    from mlabel.thresholds import ScoreHistogram
    model = load(run / "model")
    outputs, targets = split_outputs(model, load_config(str(run / "config.yaml")), "val", torch.device("cpu"), True)
    whole = ScoreHistogram(len(model.labels)).update(model.probabilities(outputs.logits), targets.labels)
    ranked = histogram_metrics(whole)
    assert streamed["mAP"] == pytest.approx(ranked["mAP"], abs=1e-9)
    assert [streamed["per_label"][n]["ap"] for n in model.labels] == pytest.approx(list(ranked["ap"]), abs=1e-9)


def test_whole_batches_for_device_augmentation_find_and_skip_a_bad_image(broken):
    from mlabel.data.batched import BatchImages, TensorAugment
    from mlabel.models import create_model
    _rewrite(broken / "train-000001.tar", broken / "t.tar",
             lambda n, d: (n, b"not an image") if n == "000000012.png" else (n, d))
    os.replace(broken / "t.tar", broken / "train-000001.tar")
    table = read_wds_table(broken, "train")
    pre = create_model("test_resnet", ["a"], pretrained=False, image_size=32).preprocessing
    for skip in (False, True):
        whole = BatchImages(table, pre, TensorAugment(pre, "light"), crop=True)
        stream = ShardStream(table, None, 8, options=StreamOptions(skip_bad=skip), batch_images=whole)
        loader = ShardLoader(stream, num_workers=2, seed=0)
        if not skip:
            with pytest.raises(DataError, match=r"train-000001.tar#000000012"):
                list(loader)
            continue
        batches = list(loader)
        assert sum(len(b["images"]) for b in batches) == 47 and tuple(batches[0]["images"].shape[1:]) == (3, 32, 32)
        assert [p for p, _ in loader.skipped] == [table.paths[12]]


def test_oversized_or_malformed_members_are_named(broken, monkeypatch):
    from mlabel.data.shards import read as shard_module
    monkeypatch.setattr(shard_module, "MAX_IMAGE_BYTES", 20_000)  # the scenes' PNGs are about 9 KB
    _rewrite(broken / "train-000000.tar", broken / "t.tar",
             lambda n, d: (n, d * 3) if n == "000000002.png" else (n, b"[1, 2" if n == "000000005.json" else d))
    os.replace(broken / "t.tar", broken / "train-000000.tar")
    with pytest.raises(DataError) as err:
        read_wds_table(broken, "train")
    assert "#000000002: sample 000000002 has an image member of" in str(err.value)
    assert "#000000005: sample 000000005 malformed JSON" in str(err.value)


@pytest.fixture
def served(shards):
    """The shards behind a local HTTP server that answers range requests (as object stores do)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            path = shards / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            wanted = self.headers.get("Range")
            if wanted:
                start, stop = (int(x) for x in wanted.split("=")[1].split("-"))
                total, data = len(data), data[start:stop + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{stop}/{total}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_shards_over_http_read_and_train_as_local_ones(served, shards, tmp_path):
    from mlabel.train import main as train_main
    remote, local = read_wds_table(served, "train"), read_wds_table(shards, "train")
    np.testing.assert_array_equal(remote.dense_targets(), local.dense_targets())
    assert remote.paths[3] == f"{served}/train-000000.tar#000000003"
    np.testing.assert_array_equal(remote.read_image(3), local.read_image(3))  # a range request
    by_pattern = read_wds_table(served, "val-{000000..000002}.tar")
    assert len(by_pattern) == 24
    with pytest.raises(DataError, match=r"cannot fetch http://127.0.0.1:\d+/nothing.tar"):
        read_wds_table(served, "nothing.tar")
    run = tmp_path / "run"
    assert train_main(["quickstart", f"out_dir={run}", "data.format=wds", f"data.root={served}", "data.train=train",
                       "data.val=val", "data.test=null", "data.generate=null", "model.backbone=test_resnet",
                       "model.pretrained=false", "data.image_size=32", "data.num_workers=2", "thresholds.cross_fit=0",
                       "thresholds.bootstrap=0", "train.epochs=1", "--quiet"]) == 0
    assert list(__import__("csv").DictReader((run / "history.csv").open()))[0]["train_images"] == "48"
    page = (run / "report" / "report.html").read_text()
    assert "data:image/jpeg" in page and "image not readable" not in page


def test_the_index_written_with_the_shards_spares_the_scan(shards, monkeypatch, tmp_path):
    from mlabel.data.shards import read as shard_module
    scanned = read_wds_table(shards, "train")  # before: the scan's table
    assert (shards / "train.index.npz").is_file()

    def no_scan(path, *args):
        raise AssertionError(f"scanned {path}")
    monkeypatch.setattr(shard_module, "_scan", no_scan)
    indexed = read_wds_table(shards, "train")
    assert indexed.paths == scanned.paths and indexed.members == scanned.members
    np.testing.assert_array_equal(indexed.dense_targets(), scanned.dense_targets())
    picked = read_wds_table(shards, "val", labels=["star", "circle"])  # a subset of the labels, reordered
    assert picked.labels == ["star", "circle"]
    # a shard changed after the index: scanned again
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in shards.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    import time
    time.sleep(0.01)
    (copy / "train-000001.tar").write_bytes((copy / "train-000001.tar").read_bytes())
    with pytest.raises(AssertionError, match="scanned"):
        read_wds_table(copy, "train")


def test_a_split_given_twice_is_refused_and_shared_shards_are_counted(shards, capsys):
    base = ["data.format=wds", f"data.root={shards}", "data.generate=null", "data.test=null"]
    cfg = load_config("quickstart", [*base, "data.train=train", "data.val=train"])
    with pytest.raises(DataError, match="data.val and data.train are the same"):
        build_splits(cfg.data, "auto", 0)
    cfg = load_config("quickstart", [*base, "data.train=train", "data.val=train-{000003..000004}.tar"])
    build_splits(cfg.data, "auto", 0)
    assert "2 shards are in both train and val" in capsys.readouterr().err


def test_evaluate_and_tune_stream_when_asked(shards, tmp_path):
    """mlabel.evaluate and mlabel.tune under thresholds.streaming (the run's config says so): the
    same streamed figures as training wrote, and thresholds tuned again from the val histograms."""
    from mlabel.evaluate import main as evaluate_main
    from mlabel.tune import main as tune_main
    run = tmp_path / "run"
    trained = _train_streamed(shards, run, "data.num_workers=0", "train.epochs=1")
    assert evaluate_main([str(run), "--split", "val", "--out", str(tmp_path / "e.json"), "--quiet"]) == 0
    streamed = json.loads((tmp_path / "e.json").read_text())["val"]
    assert "streaming" in streamed and not (run / "predictions").exists()
    for key in ("mAP", "macro_f1", "samples_f1", "subset_accuracy", "macro_ece"):
        assert streamed[key] == pytest.approx(trained[key], abs=1e-9), key
    assert tune_main([str(run), "--metric", "f1", "--quiet"]) == 0
    tuned = json.loads((run / "tune.json").read_text())
    assert tuned["policy"] == "histogram" and tuned["val_after"]["macro_f1"] == pytest.approx(trained["macro_f1"], abs=1e-9)


def test_refuses_a_folder_of_other_files_and_leaves_them_as_they_are(scene_csv, tmp_path):
    splits = scene_splits(scene_csv)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "train-000000.tar.bak").write_bytes(b"mine too")
    with pytest.raises(DataError, match=r"holds other files \(notes.txt, train-000000.tar.bak\)"):
        write_shards(splits, out, 10, Path(scene_csv).resolve(), log=lambda *a: None)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "train-000000.tar.bak"]
    assert (out / "notes.txt").read_text() == "mine"
