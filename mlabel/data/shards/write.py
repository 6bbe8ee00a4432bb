"""Writing WebDataset shards from any split: atomic per shard, resumable, byte-identical on a
rerun, the output folder locked while written, each split's index beside its shards."""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import DataError
from ...io import atomic_path, write_json
from ...rundir import LOCK, hold_run_dir
from ..tables import LabelTable
from .read import IMAGE_TYPES, VOCABULARY, Vocabulary, scan_split

__all__ = ["write_shards"]

PROGRESS = ".shard-progress.json"


def _fingerprint(splits, shard_size: int) -> str:
    digest = hashlib.sha256(json.dumps([splits.labels, shard_size]).encode())
    for name in ("train", "val", "test"):
        table = getattr(splits, name)
        if table is not None:
            digest.update(name.encode() + json.dumps(list(table.paths)).encode())
            parts = (table.targets.pos_ptr, table.targets.pos_idx, table.targets.other_ptr, table.targets.other_idx,
                     np.float32(table.targets.default)) if table.sparse else (table.targets,)
            for part in parts:  # the targets as they are held: no dense copy of a sparse table
                digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()[:16]


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed owner, mode and time: the same source writes the same bytes
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _sample_json(table: LabelTable, row: int, root: Path) -> bytes:
    target = table.target_rows(row)
    path = Path(table.paths[row])
    try:
        path = path.relative_to(root)
    except ValueError:
        pass
    return json.dumps({"labels": [table.labels[j] for j in np.flatnonzero(target == 1)],
                       "unknown": [table.labels[j] for j in np.flatnonzero(target < 0)],
                       "path": path.as_posix()}).encode()


def _write_shard(path: Path, table: LabelTable, rows: range, root: Path, check: Callable) -> list:
    """One shard, atomically; returns the (path, reason) of the images ``check`` refused."""
    bad = []
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for row in rows:
            source = table.paths[row]
            problem = check(source)
            if problem is not None:
                bad.append((source, problem))
                continue
            ext = Path(source).suffix.lower().lstrip(".").replace("jpeg", "jpg")
            key = f"{row:09d}"
            _tar_member(tar, f"{key}.{ext if ext in IMAGE_TYPES else 'img'}", Path(source).read_bytes())
            _tar_member(tar, f"{key}.json", _sample_json(table, row, root))
    return bad


def _write_index(out: Path, name: str, shards: list[str], tree: dict) -> dict:
    """The split's index beside its shards (``SPLIT.index.npz``): what a reader would learn by
    scanning them, so that no reader has to; returned: its entry in ``labels.json`` (the index
    file, its size and SHA-256, and the shards' sizes: what tells a stale index, also over HTTP)."""
    vocabulary = Vocabulary(out / VOCABULARY, tree["labels"], tree["default"], {})
    arrays, problems = scan_split([out / f for f in shards], vocabulary)
    if problems:
        raise DataError(f"the shards just written do not read back: {problems[0][0]}: {problems[0][1]}")
    file, buffer = f"{name}.index.npz", io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    with atomic_path(out / file) as tmp:
        tmp.write_bytes(data)
    return {"index": file, "index_bytes": len(data), "index_sha256": hashlib.sha256(data).hexdigest(),
            "bytes": [(out / f).stat().st_size for f in shards]}


def write_shards(splits, out: Path, shard_size: int, root: Path, *, skip_bad: bool = False,
                 log=print, check: Callable[[str], str | None] | None = None) -> dict:
    """Every split as ``out/SPLIT-000000.tar`` ... of ``shard_size`` samples, and ``out/labels.json``.

    Each shard is written to a temporary name and renamed; a progress file records the finished
    ones, so an interrupted run (kill -9, disk full) started again writes only what is missing,
    and ``labels.json``, written last, marks the set complete. A folder holding shards of another
    source is refused. Unreadable images fail (naming them) or, with ``skip_bad``, are left out
    and listed in the result. The folder is locked while it is written (as a training locks its
    run directory): a second writer into it stops at once, naming the first."""
    from ..check import image_problem
    out.mkdir(parents=True, exist_ok=True)
    with hold_run_dir(out, "mlabel data shard"):
        return _write_locked(splits, out, shard_size, root, skip_bad, log, check or image_problem)


def _read_record(path: Path) -> dict:
    """labels.json or the progress file of an earlier writer, as a JSON object."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise DataError(f"cannot read {path} ({str(err)[:200]}); give an empty --out folder") from None
    if not isinstance(record, dict):
        raise DataError(f"{path} is not what mlabel data shard writes; give an empty --out folder")
    return record


_OWN_NAME = re.compile(r"^(?:(?:train|val|test)-\d{6}\.tar|\..*\.tmp)$")


def _refuse_other_files(out: Path) -> None:
    """A folder with no shard set begun in it must hold nothing but what a killed writer leaves
    (its lock, temporaries, shards written before its first progress record): shards are never
    written among a user's files, where one could replace a file of the same name."""
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK and not _OWN_NAME.match(p.name))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise DataError(f"--out {out} holds other files ({shown}) and no shard set begun by mlabel data shard; "
                        "give a new or empty folder")


def _write_locked(splits, out: Path, shard_size: int, root: Path, skip_bad: bool, log, check) -> dict:
    fingerprint = _fingerprint(splits, shard_size)
    progress_path, vocab_path = out / PROGRESS, out / VOCABULARY
    if vocab_path.is_file():
        done = _read_record(vocab_path)
        if done.get("fingerprint") == fingerprint:
            log(f"{out} already holds these shards (labels.json is complete); nothing to do")
            return done
        raise DataError(f"{out} already holds shards of another source or shard size; give an empty --out folder")
    if not progress_path.is_file():
        _refuse_other_files(out)
    progress = _read_record(progress_path) if progress_path.is_file() else {"fingerprint": fingerprint, "done": {}}
    if progress.get("fingerprint") != fingerprint or not isinstance(progress.get("done"), dict):
        raise DataError(f"{progress_path} records shards of another source or shard size; give an empty --out "
                        "folder (or delete that folder to start over)")
    tree = {"labels": splits.labels, "task": splits.task, "default": "negative", "splits": {},
            "fingerprint": fingerprint, "skipped": []}
    for name in ("train", "val", "test"):
        table = getattr(splits, name)
        if table is None:
            continue
        shards, counts = [], []
        for number, start in enumerate(range(0, len(table), shard_size)):
            file = f"{name}-{number:06d}.tar"
            rows = range(start, min(start + shard_size, len(table)))
            if file not in progress["done"] or not (out / file).is_file():
                bad = _write_shard(out / file, table, rows, root, check)
                if bad and not skip_bad:
                    (out / file).unlink()
                    raise DataError(f"{len(bad)} images of split {name} cannot be used, e.g. {bad[0][1]}; replace "
                                    "them, or set data.on_bad_image=skip to leave them out of the shards (listed)")
                progress["done"][file] = {"samples": len(rows) - len(bad), "skipped": [list(b) for b in bad]}
                write_json(progress_path, progress)
                log(f"wrote {out / file} ({progress['done'][file]['samples']} samples)")
            shards.append(file)
            counts.append(progress["done"][file]["samples"])
            tree["skipped"] += [[name, *b] for b in progress["done"][file]["skipped"]]
        tree["splits"][name] = {"shards": shards, "samples": counts, **_write_index(out, name, shards, tree)}
    write_json(vocab_path, tree)
    progress_path.unlink()
    return tree
