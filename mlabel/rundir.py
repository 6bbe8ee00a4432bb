"""The run directory: one training at a time holds it, and an earlier run in it is never
overwritten by accident.

A run directory that already holds a run's outputs is kept: a new training goes to the first free
``DIR-2``, ``DIR-3``, ... unless ``overwrite=true`` (replace it) or ``resume`` (continue it). The
directory is locked (``DIR/.lock``: ``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows; the
operating system releases it when the holder ends, even on kill -9)
for as long as the training runs; a second training into it stops with a message naming the
holder. ``mlabel tune``, ``evaluate`` and ``report`` hold the same lock while they read the saved
model and rewrite its files (:func:`hold_run_dir`), so two of them, or one and a training, never
interleave their writes (a report of one tune's thresholds beside another's ``mlabel.json``).
"""
from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .config import ConfigError, read_yaml

__all__ = ["claim_run_dir", "hold_run_dir", "holds_run", "run_data_folder", "RUN_OUTPUTS"]

LOCK = ".lock"
UNSIGNED_WAIT_S = 2.0  # how long a held lock without a holder's line is asked again before giving up
WINDOWS_LOCK_BYTE = 1 << 30  # msvcrt locks a byte range: one far past the holder's line, which stays readable

try:  # POSIX
    import fcntl as _fcntl
except ImportError:  # Windows
    _fcntl = None
try:  # Windows
    import msvcrt as _msvcrt
except ImportError:
    _msvcrt = None
# What a training writes; a directory with any of these holds an earlier run.
RUN_OUTPUTS = ("config.yaml", "checkpoint.pt", "model", "metrics.json", "history.csv", "run.json")


def holds_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in RUN_OUTPUTS)


def _free_directory(requested: Path, keep_earlier: bool) -> Path:
    """``requested``, or when it holds an earlier run that must be kept, the first free ``-N``."""
    if requested.exists() and not requested.is_dir():
        raise ConfigError(f"out_dir {requested} is a file; give a folder path (out_dir=runs/NAME)")
    if not keep_earlier or not holds_run(requested):
        return requested
    for n in range(2, 10_000):
        candidate = requested.with_name(f"{requested.name}-{n}")
        if not candidate.exists() or (candidate.is_dir() and not holds_run(candidate)):
            return candidate
    raise ConfigError(f"out_dir {requested}: no free {requested.name}-N directory; choose another out_dir")


def _lock(folder: Path, sign: bool = True, doing: str = "training", what: str = "out_dir",
          instead: str = "or choose another out_dir"):
    """Hold ``folder/.lock`` exclusively (``sign``: writing who holds it and ``doing`` what), or
    say who holds it (``what``: how the message names the folder; ``instead``: the way out)."""
    path = folder / LOCK
    unsigned_until = time.monotonic() + UNSIGNED_WAIT_S
    while True:
        handle = open(path, "a+")
        if not _try_lock(handle):
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            if not holder and time.monotonic() < unsigned_until:
                # The holder has locked and not yet written its line, or only looked in: ask again.
                time.sleep(0.02)
                continue
            raise ConfigError(f"{what} {folder} is in use by {holder or 'another process'}; wait for it to end, "
                              f"{instead}") from None
        # The file may have been unlinked by its previous holder between our open and our lock.
        if path.exists() and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()
    if not sign:
        return handle
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                 f" ({doing})\n")
    handle.flush()
    return handle


def _try_lock(handle) -> bool:
    """Lock ``handle``'s file exclusively without waiting; False when another process holds it."""
    if _fcntl is not None:
        try:
            _fcntl.flock(handle, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    if _msvcrt is None:
        raise ConfigError("this system offers neither fcntl nor msvcrt file locks, which mlabel needs to keep "
                          "two commands out of one run directory")
    handle.seek(WINDOWS_LOCK_BYTE)
    try:
        _msvcrt.locking(handle.fileno(), _msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    finally:
        handle.seek(0)
    return True


def _release(folder: Path, handle) -> None:
    """Remove the lock file and let go. On POSIX the file goes while it is still held, so no
    other process can lock it in between; Windows cannot remove an open file, so it is closed first
    (another holder's file is then left alone)."""
    if _fcntl is not None:
        (folder / LOCK).unlink(missing_ok=True)
        handle.close()
        return
    handle.close()
    try:
        (folder / LOCK).unlink(missing_ok=True)
    except OSError:  # held again by another process meanwhile
        pass


@contextmanager
def claim_run_dir(requested: str | Path, *, overwrite: bool, resume: bool, main: bool = True,
                  agree: Callable[[Path], Path] = lambda path: path,
                  log: Callable[[str], None] = print) -> Iterator[Path]:
    """The directory this training writes to, locked while the ``with`` block runs.

    ``agree`` makes every rank of a distributed run use rank 0's choice. On the way out the
    lock is released, and a directory this call created and nothing else wrote to is removed.
    """
    requested = Path(requested)
    if main and (requested / LOCK).exists():
        _lock(requested, sign=False).close()  # a training holds it: stop here, naming the holder
    folder = _free_directory(requested, keep_earlier=not (overwrite or resume)) if main else requested
    folder = agree(folder)
    if folder != requested:
        log(f"{requested} holds an earlier run, kept as it is; this run writes to {folder} "
            "(overwrite=true replaces it, resume=true continues it)")
    if not main:
        yield folder
        return
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    handle = _lock(folder)
    try:
        yield folder
    finally:
        _release(folder, handle)
        if created and not any(folder.iterdir()):
            folder.rmdir()


@contextmanager
def hold_run_dir(folder: str | Path, doing: str) -> Iterator[Path]:
    """Lock an existing run (or model) directory while ``doing`` (e.g. ``mlabel tune``) reads its
    model and rewrites its files; a second holder stops at once with a message naming this one.
    The lock file is removed on the way out (the kernel releases the lock even on kill -9)."""
    folder = Path(folder)
    handle = _lock(folder, doing=doing, what="run directory", instead="then run this command again")
    try:
        yield folder
    finally:
        _release(folder, handle)


def run_data_folder(run_dir: Path | None) -> Path | None:
    """The data folder a run was trained on (``data.root`` of its config.yaml; a YOLO yaml's
    folder), where it still exists here: commands never write their outputs into it. None when
    the run has no readable config or its data are elsewhere (a damaged config.yaml is reported
    by the commands that need it, not here)."""
    if run_dir is None or not (Path(run_dir) / "config.yaml").is_file():
        return None
    try:  # read_yaml bounds alias expansion: a hostile config.yaml cannot blow up
        root = read_yaml(Path(run_dir) / "config.yaml", "the run's config")["data"]["root"]
    except (OSError, ConfigError, TypeError, KeyError):
        return None
    if not isinstance(root, str) or not root:
        return None
    path = Path(root)
    folder = path if path.is_dir() else path.parent if path.is_file() else None
    return folder.resolve() if folder is not None else None
