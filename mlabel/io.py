"""Atomic file writes: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import DataError

__all__ = ["atomic_path", "check_output", "check_writable", "file_sha256", "read_text", "refuse_inside",
           "remove_stale_temps", "write_json", "write_text"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode open() would give
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temps(path: str | Path) -> None:
    """Delete the temporary files :func:`atomic_path` left beside ``path`` when a writer was killed
    (kill -9 skips its clean-up). Only for files one process writes at a time (a locked run
    directory's checkpoint, a model directory being saved)."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def check_writable(path: str | Path) -> None:
    """Fail before long work when ``path`` could not be written after it: a folder in its place,
    a file where a folder should be, or a folder this process may not write to."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output {path} is a folder; give a file name")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write {path}: {existing} is a file, not a folder; choose another output path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: no write permission in {existing}; choose another output path")


EXPORT_SUFFIXES = (".onnx", ".torchscript.pt")  # what mlabel.export writes beside a model, by default there


def check_output(out: str | Path, inputs=(), export: bool = False) -> None:
    """Refuse, before any work, an output that would destroy what the command reads: a file the
    command also reads (``inputs``), or a file in a model directory (a folder holding
    ``mlabel.json`` or ``model.safetensors``), which holds the model alone; ``export`` allows the
    exported model files there. Symbolic and hard links are followed to the file they name."""
    check_writable(out)
    target = Path(out).resolve()
    for item in inputs:
        if _same_file(target, Path(item)):
            raise ValueError(f"--out {out} is also an input ({item}); writing it would overwrite the input: "
                             "choose another output path")
    from .modelfiles import META_FILE, PENDING, WEIGHTS_FILE
    folder = target.parent
    if not ((folder / META_FILE).is_file() or (folder / WEIGHTS_FILE).is_file()):
        return
    name = target.name
    own = name in (META_FILE, PENDING, WEIGHTS_FILE) or name.startswith(".") or \
        (not name.endswith(EXPORT_SUFFIXES) and name.endswith((".pt", ".pth", ".bin", ".ckpt", ".pkl")))
    if own:
        raise ValueError(f"--out {out} is a file of the model in {folder}; writing it would destroy the model: "
                         "choose a path outside the model directory")
    if not (export and name.endswith(EXPORT_SUFFIXES)):
        raise ValueError(f"--out {out} lies in the model directory {folder}, which holds the model alone: "
                         "choose a path outside it")


def refuse_inside(out: str | Path, folders, fix: str, flag: str = "--out") -> None:
    """Refuse an output that is one of ``folders`` (resolved data folders) or lies below one: mlabel
    never writes into a user's data. ``fix`` ends the message (who never writes there, and where to go)."""
    target = Path(out).resolve()
    for folder in folders:
        if target == folder or folder in target.parents:
            raise DataError(f"{flag} {out} is inside the data folder {folder}; {fix}")


def _same_file(target: Path, item: Path) -> bool:
    """Whether ``target`` (resolved) is ``item``: the same path after links, or the same file."""
    try:
        return target == item.resolve() or (target.exists() and os.path.samefile(target, item))
    except (OSError, RuntimeError):  # an input that does not exist or loops (reported where it is read)
        return False


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in chunks (a label file can be gigabytes)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def read_text(path: Path) -> str:
    """A UTF-8 annotation file as text, or a :class:`DataError` naming the line that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x}); save it as UTF-8, "
                        f"e.g. iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}") from None
