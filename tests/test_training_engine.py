"""Training-engine features: EMA, mixing, accumulation, precision, schedules, early stopping,
and resume after SIGKILL."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mlabel.engine import ModelEma, build_scheduler, mix_batch, train_one_epoch
from mlabel.outputs import Targets
from mlabel.losses import BCEWithLogits
from mlabel.train import main as train_main


def test_ema_follows_its_update_rule():
    """timm's ModelEmaV3 warm-up, written out: update 1 copies, update k uses
    d = min(decay, 1 - k ** (-2/3)); the checkpoint keeps the count."""
    model = nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.9, warmup=True)
    expected = ema.module.weight.detach().clone()
    for k in range(1, 8):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
        d = 0.0 if k == 1 else min(0.9, 1 - k ** (-2 / 3))
        expected = d * expected + (1 - d) * model.weight.detach()
        torch.testing.assert_close(ema.module.weight, expected)
    assert not any(p.requires_grad for p in ema.module.parameters())
    again = ModelEma(nn.Linear(3, 2), decay=0.9)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 7 and torch.equal(again.module.weight, ema.module.weight)
    flat = ModelEma(nn.Linear(3, 2), decay=0.5, warmup=False)
    flat.update(model)
    flat.update(model)  # second update: plain decay
    assert flat.updates == 2


def test_mixup_and_cutmix_mix_targets_with_the_image_lambda():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 16, 16)
    labels = torch.tensor([[1.0, 0, -1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    values = torch.tensor([[1.0, float("nan")], [2.0, 5.0], [3.0, 6.0], [4.0, 7.0]])  # regression targets
    targets = Targets(labels, values)
    mixed, t = mix_batch(images, targets, mixup_alpha=0.4, cutmix_alpha=0.0)
    lam = float(((mixed[0] - images[3]) / (images[0] - images[3]))[0, 0, 0])
    torch.testing.assert_close(t.labels[0, :2], lam * labels[0, :2] + (1 - lam) * labels[3, :2])
    assert t.labels[0, 2] == -1  # unknown in one image: unknown in the mix
    torch.testing.assert_close(t.regression[1], lam * values[1] + (1 - lam) * values[2])  # linear
    assert torch.isnan(t.regression[0, 1]) and torch.isnan(t.regression[3, 1])  # missing in one: missing
    torch.manual_seed(1)
    images = torch.zeros(4, 1, 20, 20) + torch.arange(4.0)[:, None, None, None]
    mixed, t = mix_batch(images, Targets(labels), mixup_alpha=0.0, cutmix_alpha=1.0)
    pasted = float((mixed[1] == images[2]).float().mean())  # share of image 1 now from image 2
    torch.testing.assert_close(t.labels[1], (1 - pasted) * labels[1] + pasted * labels[2])
    assert t.regression is None
    same, t2 = mix_batch(images, targets, 0.4, 0.0, prob=0.0)
    assert same is images and t2 is targets


def _toy(batch_size):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 4, 4, generator=g), (torch.rand(16, 2, generator=g) > 0.5).float()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _run(batch_size, accumulate, precision="fp32"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = build_scheduler(optimizer, 100, 0)
    from mlabel.engine import Stepper, grad_scaler_for
    stepper = Stepper(optimizer, scheduler, grad_scaler_for(torch.device("cpu"), precision),
                      accumulate=accumulate, precision=precision)
    row = train_one_epoch(model, _toy(batch_size), BCEWithLogits(), stepper, torch.device("cpu"), 1, quiet=True)
    return model, row


def test_gradient_accumulation_equals_the_larger_batch():
    big, _ = _run(8, 1)
    accumulated, _ = _run(4, 2)
    for a, b in zip(big.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_with_a_scaler_for_fp16(precision):
    reference, _ = _run(8, 1)
    model, row = _run(8, 1, precision)
    assert np.isfinite(row["train_loss"])
    for a, b in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, atol=0.02, rtol=0)  # the same steps up to rounding


def _rates(kind: str, steps: int, warmup: int, lr: float) -> list[float]:
    """The learning rate of every step of a ``kind`` schedule."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_scheduler(optimizer, steps, warmup, kind)
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def test_onecycle_rises_then_decays():
    lrs = _rates("onecycle", 100, 0, 1.0)
    assert lrs[0] == pytest.approx(0.04) and max(lrs) == pytest.approx(1.0, abs=1e-3)
    assert int(np.argmax(lrs)) == 10 and lrs[-1] < 0.01


def test_constant_schedule_warms_up_then_holds_the_base_rate():
    lrs = _rates("constant", 50, 4, 0.5)
    assert lrs[:4] == pytest.approx([0.125, 0.25, 0.375, 0.5]) and lrs[4:] == [0.5] * 46


def _cmd(out, scene_csv, extra=()):
    return ["quickstart", f"out_dir={out}", "model.backbone=test_resnet", "model.pretrained=false",
            "data.generate=null", "data.image_size=32", "data.batch_size=8", "data.num_workers=0",
            "train.channels_last=false", f"data.root={scene_csv}", "data.val=val.csv", "data.test=null",
            "thresholds.cross_fit=0", "--quiet", *extra]


def test_ema_winner_is_recorded_and_saved(tmp_path, scene_csv):
    out = tmp_path / "run"
    assert train_main(_cmd(out, scene_csv, ["train.epochs=2", "train.ema=true", "train.ema_decay=0.9",
                                            "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0",
                                            "train.grad_clip=1.0", "train.schedule=onecycle"])) == 0
    run = json.loads((out / "run.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())["val"]
    assert metrics["weights"] == run["weights"] in ("model", "ema")
    history = [json.loads(json.dumps(r)) for r in __import__("csv").DictReader((out / "history.csv").open())]
    assert all("val_mAP_ema" in r for r in history)
    # The saved weights are the ones that won: their val mAP is the best one recorded.
    assert metrics["mAP"] == pytest.approx(run["best_val_mAP"], abs=1e-6)


def test_early_stopping_stops_after_patience(tmp_path, scene_csv):
    out = tmp_path / "run"
    assert train_main(_cmd(out, scene_csv, ["train.epochs=6", "train.lr=0", "train.early_stop_patience=1"])) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["stopped_early"] is True
    assert len((out / "history.csv").read_text().splitlines()) == 1 + 2  # header, epochs 1 and 2


def test_sigkill_at_random_moments_then_resume_gives_the_same_result(tmp_path, scene_csv):
    extra = ["train.epochs=5", "train.ema=true", "train.accumulate=2", "train.mixup_alpha=0.2"]
    env = dict(os.environ, PYTHONHASHSEED="0")
    reference = tmp_path / "reference"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mlabel.train", *_cmd(reference, scene_csv, extra)],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    uninterrupted = time.perf_counter() - started  # process start included, as for the killed runs
    expected = json.loads((reference / "metrics.json").read_text())

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "mlabel.train", *_cmd(out, scene_csv, extra + ["resume=true"])]
    rng = random.Random(0)
    kills, scale = 0, 1.0
    started_total = time.perf_counter()
    while kills < 3:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Kill points scale with this machine's speed: three attempts of at most half the
        # uninterrupted time (each restarting the process) cannot finish the run between them.
        delay = rng.uniform(0.25, 0.5) * uninterrupted * scale
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        # Finished before the kill: the machine got faster than during the reference run (other
        # jobs ended). Start over in a fresh directory with kill points half as late.
        assert scale > 0.1, "the run keeps finishing before three kills; the test needs a longer run"
        shutil.rmtree(out)
        kills, scale = 0, scale / 2
    final = subprocess.run(command, env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    got = json.loads((out / "metrics.json").read_text())
    for key in ("mAP", "macro_f1", "micro_f1", "macro_auroc"):
        assert got["val"][key] == pytest.approx(expected["val"][key], abs=1e-9), key
    assert got["val"]["per_label"] == expected["val"]["per_label"]
    assert time.perf_counter() - started_total < 300


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path, scene_csv):
    # freeze_norm_stats keeps batch-norm on its running statistics: per-rank batch statistics
    # would otherwise differ from the single process's by construction.
    extra = ["train.epochs=2", "train.freeze_norm_stats=true", "train.freeze_backbone_epochs=1",
             "train.lr=0.01", "data.test=val.csv", "data.allow_overlap=true"]
    single = tmp_path / "single"
    base = _cmd(single, scene_csv, extra)
    base[base.index("data.batch_size=8")] = "data.batch_size=16"
    assert train_main(base) == 0
    double = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "mlabel.train", *_cmd(double, scene_csv, extra + ["train.device=cpu"])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((single / "metrics.json").read_text())
    two = json.loads((double / "metrics.json").read_text())
    assert json.loads((double / "run.json").read_text())["world_size"] == 2
    assert two["val"]["n_images"] == one["val"]["n_images"] == 24  # the whole val set, gathered
    for split in ("val", "test"):
        for key in ("mAP", "macro_auroc"):
            assert two[split][key] == pytest.approx(one[split][key], abs=2e-3), (split, key)
        # micro F1 counts 120 thresholded decisions: one decision flipped by the ranks' different
        # float summation order moves it by about 0.003 here; allow that one, not two
        assert two[split]["micro_f1"] == pytest.approx(one[split]["micro_f1"], abs=4e-3), split
    h1 = [float(r["train_loss"]) for r in __import__("csv").DictReader((single / "history.csv").open())]
    h2 = [float(r["train_loss"]) for r in __import__("csv").DictReader((double / "history.csv").open())]
    assert h2 == pytest.approx(h1, rel=1e-3)


def test_tensorboard_scalars_are_written_when_asked(tmp_path, scene_csv):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    assert train_main(_cmd(out, scene_csv, ["train.epochs=2", "log.tensorboard=true"])) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val_mAP")] == [1, 2]
    assert {"train_loss", "val_loss", "lr"} <= set(events.Tags()["scalars"])


def test_compile_opt_in_trains(tmp_path, scene_csv, monkeypatch):
    calls = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: calls.append(module) or real(module, backend="eager"))
    out = tmp_path / "run"
    assert train_main(_cmd(out, scene_csv, ["train.epochs=1", "train.compile=true"])) == 0
    assert len(calls) == 1 and (out / "model" / "model.safetensors").is_file()


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(
        tmp_path, scene_csv, monkeypatch, capsys):
    from mlabel.checkpoint import load_checkpoint
    from mlabel.distributed import OutputsModule
    real, calls = OutputsModule.forward, []

    def poisoned(self, images):  # the training forward (validation calls the model directly)
        calls.append(1)
        outputs = real(self, images)
        return outputs._replace(logits=torch.full_like(outputs.logits, float("nan"))) if len(calls) == 9 else outputs
        # the 9th training batch: epoch 2, step 2 (six batches of 8 per epoch)

    monkeypatch.setattr(OutputsModule, "forward", poisoned)
    out = tmp_path / "run"
    assert train_main(_cmd(out, scene_csv, ["train.epochs=3"])) == 2
    err = capsys.readouterr().err
    assert "at epoch 2, step 2" in err and "resume=true" in err and "Traceback" not in err
    assert load_checkpoint(out / "checkpoint.pt")["train_state"]["epoch"] == 1
    monkeypatch.setattr(OutputsModule, "forward", real)
    assert train_main(_cmd(out, scene_csv, ["train.epochs=3", "resume=true"])) == 0
    assert len((out / "history.csv").read_text().splitlines()) == 1 + 3


def test_decoded_cache_gives_the_same_validation_metrics(tmp_path, scene_csv):
    from mlabel.data.cache import DecodedCache
    from mlabel.data.tables import read_csv_table
    from mlabel.preprocess import preprocess_image
    cache_dir = tmp_path / "cache"
    extra = ["train.epochs=2", "data.augment=none", "data.test=val.csv", "data.allow_overlap=true",
             "train.precision=fp32"]  # bf16 rounds the two paths' equal pixels differently
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    assert train_main(_cmd(plain, scene_csv, extra)) == 0
    assert train_main(_cmd(cached, scene_csv, extra + ["data.cache=true", f"data.cache_dir={cache_dir}"])) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (plain, cached))
    for split in ("val", "test"):
        for key in ("mAP", "macro_f1", "micro_f1", "macro_auroc"):
            assert a[split][key] == b[split][key], (split, key)
    # evaluation pixels from the cache are the pixels from the files; the cache is reused and
    # rebuilt when the resize settings change
    table = read_csv_table(scene_csv / "val.csv", scene_csv)
    pre = {"image_size": 32, "resize": "crop", "crop_pct": 0.875, "interpolation": "bilinear",
           "mean": [0.5] * 3, "std": [0.25] * 3}
    cache = DecodedCache(table, pre, cache_dir, quiet=True)
    for i in (0, 5, 23):
        np.testing.assert_array_equal(preprocess_image(np.asarray(cache.images[i]), pre),
                                      preprocess_image(table.paths[i], pre))
    assert not DecodedCache(table, pre, cache_dir, quiet=True).built
    assert DecodedCache(table, dict(pre, interpolation="bicubic"), cache_dir, quiet=True).built


def test_resume_with_a_changed_config_stops_and_names_the_keys(tmp_path, scene_csv, capsys):
    out = tmp_path / "run"
    assert train_main(_cmd(out, scene_csv, ["train.epochs=1", "resume=true"])) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert train_main(_cmd(out, scene_csv, ["train.epochs=1", "resume=true", "train.lr=0.5"])) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "checkpoint.pt" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # keys that only matter after training may change: the resume goes on
    assert train_main(_cmd(out, scene_csv, ["train.epochs=1", "resume=true", "thresholds.policy=argmax"])) == 0


def test_checkpoint_rng_holds_cuda_states_when_cuda_is_used():
    from mlabel.checkpoint import capture_rng, restore_rng
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (runs under -k cuda on a GPU machine)")
    torch.zeros(1, device="cuda")  # initialise CUDA
    state = capture_rng()
    first = torch.rand(4, device="cuda")
    restore_rng(state)
    assert torch.equal(torch.rand(4, device="cuda"), first)


def test_resume_from_a_corrupt_checkpoint_is_one_clear_error(tmp_path, scene_csv, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    assert train_main(_cmd(out, scene_csv, ["train.epochs=1", "resume=true"])) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt is not a readable mlabel checkpoint" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]  # nothing written


def test_plateau_schedule_holds_the_rate_until_told_then_anneals_to_one_percent():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = build_scheduler(optimizer, 40, 4, "plateau")
    factor, lrs = scheduler.lr_lambdas[0], []
    for step in range(40):
        if step == 15:
            assert factor.decay_now(scheduler.last_epoch) and not factor.decay_now(scheduler.last_epoch)
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0]) and lrs[4:16] == [2.0] * 12
    expected = [2.0 * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * (s - 15) / 25))) for s in range(15, 40)]
    assert lrs[15:] == pytest.approx(expected)
    # the decay's start travels with the scheduler's state (checkpoints, resume)
    again = build_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0), 40, 4, "plateau")
    again.load_state_dict(scheduler.state_dict())
    assert again.lr_lambdas[0].decay_from == 15
    assert not build_scheduler(optimizer, 40, 4, "cosine").lr_lambdas[0].decay_now(10)  # cosine decays anyway


@pytest.mark.parametrize("scores, anneals_after", [([0.5, 0.6, 0.55, 0.7, 0.8], 3),  # a real drop
                                                  ([0.5, 0.6, 0.599, 0.7, 0.8], None),  # a dip within noise
                                                  ([0.5, 0.6, 0.599, 0.598, 0.8], 4)])  # two epochs, no new best
def test_plateau_run_anneals_once_val_map_stalls(tmp_path, scene_csv, monkeypatch, scores, anneals_after):
    """Val mAP scripted: the rate holds while it improves, then falls from the stall on."""
    import mlabel.loop as loop
    scripted = iter(scores)
    monkeypatch.setattr(loop.EpochLoop, "validate", lambda self, module, loss=None: (next(scripted), 0.1))
    out = tmp_path / "run"
    assert train_main(_cmd(out, scene_csv, ["train.epochs=5", "train.schedule=plateau", "train.warmup_epochs=0",
                                            "train.lr=0.001"])) == 0
    rows = list(__import__("csv").DictReader((out / "history.csv").open()))
    lrs = [float(r["lr"]) for r in rows]  # the rate of each epoch's last step
    held = anneals_after or 5
    assert lrs[:held] == pytest.approx([0.001] * held)
    if anneals_after:
        assert all(a > b for a, b in zip(lrs[held - 1:], lrs[held:])) and lrs[4] == pytest.approx(1e-5, rel=1e-6)
