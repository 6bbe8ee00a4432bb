"""What a resume may continue: the checkpoint read once, and compared, resolved against resolved,
with the run that is about to start.

A checkpoint stores the config after every ``auto`` and every rewrite of the run was decided
(``data.root`` of a generated set, the defaults from the data), plus a *guard*: a fingerprint of
each split's label table and the shape of the training stream (world size; for shard streams
the loader workers, which cut each epoch's shard plan). A resume that would train on other data
or replay a different stream is refused with the key or file named; one that would only redo a
finished run says there is nothing to resume and leaves the run as it is.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .checkpoint import config_differences, load_checkpoint
from .config import ConfigError
from .data.members import ShardPaths

__all__ = ["finished_run", "interrupted_siblings", "load_resume", "resume_guard"]

FINISHED = "finished"  # run.json's flag, set once every output of the run is written


def _update_array(digest, array) -> None:
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())


def fingerprint_table(table) -> str:
    """A digest of a split's label table: image names, label names, targets (dense or sparse)
    and regression targets. Any edit of a label file that changes what is trained changes it."""
    digest = hashlib.sha256()
    digest.update(json.dumps(list(table.labels)).encode())
    paths = table.paths
    if isinstance(paths, ShardPaths):  # its arrays, not a string per image (millions of samples at start-up)
        digest.update(json.dumps(paths.shards).encode())
        _update_array(digest, paths.shard_of)
        _update_array(digest, paths.keys)
    else:
        for path in paths:
            digest.update(str(path).encode("utf-8", "surrogateescape") + b"\0")
    targets = table.targets
    if table.sparse:
        digest.update(f"sparse{targets.num_labels},{targets.default}".encode())
        for array in (targets.pos_ptr, targets.pos_idx, targets.other_ptr, targets.other_idx):
            _update_array(digest, array)
    else:
        _update_array(digest, targets)
    if table.regression is not None:
        _update_array(digest, table.regression)
    return digest.hexdigest()[:32]


def resume_guard(splits, num_workers: int, world_size: int) -> dict:
    """What the checkpoint records beside the config: each split's fingerprint and source, and
    what the order of the training stream depends on besides the config."""
    tables = {name: getattr(splits, name) for name in ("train", "val", "test")}
    streamed = splits.train.members is not None
    return {"data": {name: {"fingerprint": fingerprint_table(table), "source": str(table.source)}
                     for name, table in tables.items() if table is not None},
            "world_size": world_size, "stream_workers": num_workers if streamed else None}


def _guard_differences(saved: dict, current: dict, path: Path) -> list[str]:
    found = []
    for name, now in current["data"].items():
        then = saved.get("data", {}).get(name)
        if then is None or then["fingerprint"] != now["fingerprint"]:
            found.append(f"the {name} labels ({now['source']}) are not those the checkpoint was trained on "
                         "(a label file was edited, or other files are named); restore them")
    if saved.get("world_size") != current["world_size"]:
        found.append(f"the checkpoint was trained by {saved.get('world_size')} process(es), this run has "
                     f"{current['world_size']}: resume with the same number of processes (torchrun --nproc_per_node)")
    if saved.get("stream_workers") != current["stream_workers"]:
        found.append(f"data.num_workers: {saved.get('stream_workers')!r} -> {current['stream_workers']!r} "
                     "(the shard stream's order is planned per loader worker, so an epoch would train some "
                     f"samples twice and others never): set data.num_workers={saved.get('stream_workers')} back")
    return found


def load_resume(resume: bool | str, config: dict, checkpoint_path: Path, guard: dict) -> tuple[Path, dict] | None:
    """The checkpoint to resume from (read once, before anything is written), or None.

    ``resume``: the config's ``resume`` key; ``config``: the resolved config of the run about to
    start as its checkpoints hold it (:func:`mlabel.resolve.saved_config`) and ``guard`` its
    :func:`resume_guard`; every key that shapes training must equal the checkpoint's (an older
    checkpoint without its config or guard is taken as it is)."""
    if not resume:
        return None
    path = checkpoint_path if resume is True else Path(resume)
    if not path.is_file():
        if resume is not True:
            raise ConfigError(f"resume={resume}: no checkpoint at that path")
        return None
    try:
        saved = load_checkpoint(path)
    except Exception as err:  # truncated, foreign or tampered: torch's message names the cause
        raise ConfigError(f"resume: {path} is not a readable mlabel checkpoint ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); delete it or set resume=false") from None
    changed = config_differences(saved["config"], config) if isinstance(saved.get("config"), dict) else []
    if changed:
        raise ConfigError(f"resume: {path} was written with a different config (" + "; ".join(changed)
                          + "); set those keys back, or train into a new out_dir")
    if isinstance(saved.get("guard"), dict):
        problems = _guard_differences(saved["guard"], guard, path)
        if problems:
            raise ConfigError(f"resume: {path} cannot be continued here: " + "; ".join(problems)
                              + "; or train into a new out_dir")
    return path, saved


def finished_run(out_dir: Path) -> dict | None:
    """The metrics of a run in ``out_dir`` that finished (every output written), else None."""
    run_json, metrics = out_dir / "run.json", out_dir / "metrics.json"
    try:
        done = json.loads(run_json.read_text()).get(FINISHED) is True
        return json.loads(metrics.read_text()) if done else None
    except (OSError, ValueError, AttributeError):
        return None


def interrupted_siblings(out_dir: Path) -> list[Path]:
    """``DIR-2``, ``DIR-3``, ... beside ``out_dir`` that hold an interrupted run: where a training
    went when ``out_dir`` already held one, and what ``resume=true`` on ``out_dir`` may have meant."""
    found = []
    for sibling in sorted(out_dir.parent.glob(f"{out_dir.name}-*")):
        suffix = sibling.name[len(out_dir.name) + 1:]
        if suffix.isdigit() and (sibling / "checkpoint.pt").is_file() and finished_run(sibling) is None:
            found.append(sibling)
    return found
