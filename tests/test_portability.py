"""Every OS (issue 30, item 5): the train / predict / load paths run with the POSIX-only calls
made unavailable, as on macOS or Windows (monkeypatched away), and give the same results."""
import os

import numpy as np
import pytest

from mlabel.data.cache import DecodedCache
from mlabel.data.tables import read_csv_table
from mlabel.preprocess import preprocess_image

PRE = {"image_size": 32, "resize": "crop", "crop_pct": 0.875, "interpolation": "bilinear",
       "mean": [0.5] * 3, "std": [0.25] * 3}


def test_decoded_cache_without_posix_fallocate(scene_csv, tmp_path, monkeypatch):
    """macOS and Windows have no os.posix_fallocate: the cache is sized after the free-space
    check instead, and holds the same pixels as one built with it."""
    table = read_csv_table(scene_csv / "val.csv", scene_csv)
    with_it = DecodedCache(table, PRE, tmp_path / "linux", quiet=True)
    monkeypatch.delattr(os, "posix_fallocate", raising=False)
    without = DecodedCache(table, PRE, tmp_path / "other", quiet=True)
    assert without.built
    np.testing.assert_array_equal(np.asarray(without.images), np.asarray(with_it.images))
    for i in (0, len(table) - 1):
        np.testing.assert_array_equal(preprocess_image(np.asarray(without.images[i]), PRE),
                                      preprocess_image(table.paths[i], PRE))


# What macOS/Windows lack, made unavailable in a fresh process: fcntl (Windows), os.posix_fallocate
# (macOS, Windows), os.sched_getaffinity (macOS, Windows), and a folder that os.open refuses
# (Windows). msvcrt's byte-range lock is simulated with the real fcntl.lockf, which, like it, is
# released when the process ends.
NOT_POSIX = r"""
import os, sys
import fcntl as real_fcntl
import torch, timm  # third-party imports first: only mlabel's own code runs without fcntl

class msvcrt:
    LK_NBLCK = 2

    @staticmethod
    def locking(fd, mode, nbytes):
        real_fcntl.lockf(fd, real_fcntl.LOCK_EX | real_fcntl.LOCK_NB, nbytes, os.lseek(fd, 0, os.SEEK_CUR))

sys.modules["fcntl"] = None  # import fcntl -> ImportError, as on Windows
sys.modules["msvcrt"] = msvcrt
for name in ("posix_fallocate", "sched_getaffinity"):
    if hasattr(os, name):
        delattr(os, name)
real_open = os.open

def windows_open(path, flags, *args, **kwargs):
    if os.path.isdir(path):
        raise PermissionError(13, "Permission denied", str(path))
    return real_open(path, flags, *args, **kwargs)

os.open = windows_open
"""


def _not_posix(code: str, tmp_path, *args) -> "subprocess.CompletedProcess":
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", NOT_POSIX + code, *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))


def test_train_predict_and_load_without_posix_only_calls(tmp_path, scene_csv):
    code = r"""
import sys
import mlabel.rundir
assert mlabel.rundir._fcntl is None and mlabel.rundir._msvcrt is not None
from mlabel.train import main as train
from mlabel.predict import main as predict
import mlabel
run, data = sys.argv[1], sys.argv[2]
assert train(["quickstart", f"out_dir={run}", f"data.root={data}", "data.generate=null", "data.val=val.csv",
              "data.test=null", "model.backbone=test_resnet", "model.pretrained=false", "data.image_size=32",
              "data.num_workers=0", "data.cache=true", f"data.cache_dir={run}-cache", "thresholds.cross_fit=0",
              "thresholds.bootstrap=0", "train.epochs=1", "--quiet"]) == 0
assert predict([run, f"{data}/images", "--out", f"{run}.csv", "--quiet"]) == 0
model = mlabel.load(run)
model.save_pretrained(f"{run}-copy")  # a save syncs its folder where the OS allows
assert mlabel.load(f"{run}-copy").labels == model.labels
print("ok")
"""
    done = _not_posix(code, tmp_path, tmp_path / "run", scene_csv)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file() and not (tmp_path / "run" / ".lock").exists()


def test_the_windows_lock_keeps_a_second_command_out_and_frees_on_kill(tmp_path):
    import signal
    import subprocess
    import sys
    holder_code = r"""
import sys, time
from mlabel.rundir import hold_run_dir
with hold_run_dir(sys.argv[1], "mlabel tune"):
    print("held", flush=True)
    time.sleep(600)
"""
    second_code = r"""
import sys
from mlabel.rundir import hold_run_dir
try:
    with hold_run_dir(sys.argv[1], "mlabel report"):
        print("got it")
except Exception as err:
    print("refused:", err)
"""
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", NOT_POSIX + holder_code, str(folder)], stdout=subprocess.PIPE,
                              text=True, cwd=tmp_path)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = _not_posix(second_code, tmp_path, folder).stdout
        assert refused.startswith("refused:") and f"pid {holder.pid}" in refused and "(mlabel tune)" in refused, refused
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert _not_posix(second_code, tmp_path, folder).stdout.strip() == "got it"  # the OS let go of the killed holder
