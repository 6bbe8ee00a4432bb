"""Evaluation in one place: scoring a split, exactly or streamed, for training (per-epoch val mAP
and the final metrics), ``mlabel tune``, ``mlabel evaluate`` and the report.

:func:`scorer` makes the exact-or-streamed choice once, from :class:`EvalSettings` (the resolved
config's thresholds, calibration and precision settings) and the split's size: an
:class:`ExactScorer` collects the (N, L) outputs in one pass and scores them as often as asked;
a :class:`StreamedScorer` keeps per-label histograms and decision counts only
(``thresholds.streaming``) and passes over the split for each question. Both answer the same
four calls (``metrics``, ``tune``, ``ranking``, ``scores``) with the same types, and both build
their ``metrics.json`` section through :func:`mlabel.metrics.evaluate_predictions` or
:meth:`mlabel.streaming.SplitStream.metrics`, which share one table builder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .calibration import apply_calibration, fit_calibration
from .distributed import World, gather_rows, mean_across
from .engine import collect_predictions
from .metrics import average_precision, calibration_error, cutoff_metrics, evaluate_predictions, nanmean
from .outputs import Outputs, Targets, map_fields
from .policy import ThresholdSettings, choose, cross_fit_predictions
from .resolve import resolve_for_model

__all__ = ["EvalSettings", "ExactScorer", "StreamedScorer", "calibrate_and_tune", "collect_split",
           "evaluate_outputs", "scorer", "split_loader", "split_outputs"]


@dataclass(frozen=True)
class EvalSettings:
    """What scoring and tuning a split read from the resolved config, taken once.

    ``streaming``: per-label histograms instead of the (N, L) scores (the resolved
    ``thresholds.streaming``). ``thresholds``: the threshold policy's settings
    (:func:`calibrate_and_tune`, and the cross-fitting of :func:`evaluate_outputs`, with
    ``cross_fit`` folds)."""
    streaming: bool = False
    bins: int = 2048
    calibration: str = "platt"
    channels_last: bool = False
    thresholds: ThresholdSettings = field(default_factory=ThresholdSettings)
    cross_fit: int = 0

    @classmethod
    def from_config(cls, cfg) -> "EvalSettings":
        """The settings of a :class:`~mlabel.resolve.ResolvedConfig`."""
        thresholds = ThresholdSettings.of(cfg.thresholds, cfg.seed, defaulted="thresholds.policy" in cfg.decided)
        return cls(streaming=cfg.thresholds.streaming, bins=cfg.thresholds.bins, calibration=cfg.calibration.method,
                   channels_last=cfg.train.channels_last, cross_fit=cfg.thresholds.cross_fit, thresholds=thresholds)


def scorer(model, loader, device, settings: EvalSettings, *, world: World = World(), quiet: bool = False,
           desc: str = ""):
    """The scorer of ``model`` on the split of ``loader``: exact, or streamed under ``settings.streaming``."""
    return (StreamedScorer if settings.streaming else ExactScorer)(model, loader, device, settings, world, quiet, desc)


class _Scorer:
    streamed = False

    def __init__(self, model, loader, device, settings: EvalSettings, world: World, quiet: bool, desc: str):
        self.model, self.loader, self.device, self.settings = model, loader, device, settings
        self.world, self.quiet, self.desc = world, quiet, desc


class ExactScorer(_Scorer):
    """Every image's outputs, collected once (gathered over the ranks) and scored at will."""

    def __init__(self, *args):
        super().__init__(*args)
        self._collected: tuple[Outputs, Targets] | None = None

    def scores(self) -> tuple[Outputs, Targets]:
        """The split's outputs and targets (one pass, then kept)."""
        if self._collected is None:
            outputs, targets, _ = collect_split(self.model, self.loader, self.device, self.world,
                                                channels_last=self.settings.channels_last,
                                                progress=None if self.quiet else self.desc)
            self._collected = outputs, targets
        return self._collected

    def metrics(self, cross_fit: bool = False) -> dict:
        """The split's metrics.json section at the model's thresholds (``cross_fit``: with the
        cross-fitted F1 of ``settings.cross_fit``)."""
        folds = self.settings.cross_fit if cross_fit else 0
        return evaluate_outputs(self.model, *self.scores(), cross_fit=folds, settings=self.settings.thresholds)

    def tune(self) -> dict:
        """Fit the calibration and choose the thresholds on this split (val); stored in the model."""
        outputs, targets = self.scores()
        return calibrate_and_tune(self.model, outputs.logits, targets.labels, self.settings.calibration,
                                  self.settings.thresholds)

    def ranking(self, loss_fn=None) -> tuple[float, float | None]:
        """(mAP, mean loss) of a fresh pass: the per-epoch validation."""
        outputs, targets, loss = collect_split(self.model, self.loader, self.device, self.world, loss_fn,
                                               channels_last=self.settings.channels_last,
                                               progress=None if self.quiet else "eval")
        return nanmean(average_precision(outputs.logits, targets.labels)) or 0.0, loss


class StreamedScorer(_Scorer):
    """Per-label histograms and decision counts summed over the ranks: no (N, L) scores held."""
    streamed = True

    def scores(self) -> None:
        """Nothing per image is kept when streaming."""
        return None

    def metrics(self, cross_fit: bool = False) -> dict:
        """The split's metrics.json section at the model's thresholds (no cross-fitting: it
        needs per-image scores)."""
        model = self.model
        stream = self._pass(thresholds=model.thresholds.cpu().numpy())[0]
        metrics = stream.metrics(model.labels, model.task == "binary")
        metrics["calibration"] = model.calibration or "none"
        return metrics

    def tune(self) -> dict:
        """The calibration and thresholds from one pass: the histograms of the plain sigmoid give
        the calibration (fitted on the bins) and each label's best bin edge for the objective,
        mapped through the calibration (the same decisions). Both are stored in the model."""
        from .calibration import fit_calibration_from_histogram
        t, method, model = self.settings.thresholds, self.settings.calibration, self.model
        model.set_calibration(None)
        histogram = self._pass(fit_calibration=method != "none")[0].histogram
        raw, values = histogram.tune(t.metric, **t.plan.objective, labels=model.labels, fallback=t.fallback,
                                     return_scores=True)
        thresholds = torch.as_tensor(raw).double()
        if method != "none":
            scale, bias = fit_calibration_from_histogram(histogram, method)
            model.set_calibration(method, scale, bias)
            thresholds = apply_calibration(torch.logit(thresholds), scale.double(), bias.double())
        model.set_thresholds(thresholds.float())
        return {"policy": "histogram", "metric": t.metric, "bins": self.settings.bins,
                "per_label": {name: {"threshold": float(th), "val_" + t.metric: float(v)}
                              for name, th, v in zip(model.labels, model.thresholds.tolist(), values.tolist())}}

    def ranking(self, loss_fn=None) -> tuple[float, float | None]:
        from .streaming import histogram_metrics
        stream, loss = self._pass(loss_fn=loss_fn)
        return histogram_metrics(stream.histogram)["mAP"] or 0.0, loss

    def _pass(self, thresholds=None, loss_fn=None, fit_calibration: bool = False):
        """One pass into a :class:`~mlabel.streaming.SplitStream` summed over the ranks, and the
        mean loss (``fit_calibration``: keeping the logits' moments the calibration is fitted on).
        Each rank feeds its own images; the evaluation sampler's padding (the first images again,
        so that every rank has as many) is left out."""
        from .streaming import SplitStream
        model, world = self.model, self.world
        calibrated = getattr(model, "calibration", None) is not None
        stream = SplitStream(model.num_labels, self.settings.bins, thresholds, uncalibrated=calibrated,
                             logits=fit_calibration)
        left = [len(range(world.rank, len(self.loader.dataset), world.size))]  # this rank's own images

        def consume(outputs, targets):
            take = min(left[0], len(outputs.logits))
            left[0] -= take
            if take:
                logits = outputs.logits[:take].float().cpu()
                stream.update(model.probabilities(logits), targets.labels[:take],
                              torch.sigmoid(logits) if calibrated else None, logits if fit_calibration else None)

        _, _, loss = collect_predictions(model, self.loader, self.device, loss_fn,
                                         channels_last=self.settings.channels_last,
                                         progress=None if self.quiet else "eval", consume=consume)
        return stream.all_reduce(world), None if loss is None else mean_across(loss, world)


def collect_split(model, loader, device, world: World, loss_fn=None, **kwargs):
    """Outputs and targets of a whole split: each rank runs its shard, then they are gathered."""
    outputs, targets, loss = collect_predictions(model, loader, device, loss_fn, **kwargs)
    total = len(loader.dataset)
    loss = None if loss is None else mean_across(loss, world)
    gather = lambda rows: gather_rows(rows, total, world)  # noqa: E731
    return map_fields(outputs, gather), map_fields(targets, gather), loss


def calibrate_and_tune(model, logits: torch.Tensor, targets: torch.Tensor, calibration: str = "platt",
                       settings: ThresholdSettings = ThresholdSettings()) -> dict:
    """Fit the ``calibration`` (``none``, ``temperature``, ``platt``) on the val label logits
    (N, L) and their targets, then choose thresholds on the calibrated probabilities with the
    policy of ``settings``; both are stored in ``model``. Returns the policy's record for
    metrics.json (policy, and per label the threshold, its val objective and bootstrap interval)."""
    if calibration == "none":
        model.set_calibration(None)
    else:
        scale, bias = fit_calibration(logits, targets, calibration)
        model.set_calibration(calibration, scale, bias)
    probs = model.probabilities(logits)
    choice = choose(probs, targets, settings, model.labels)
    model.set_thresholds(torch.from_numpy(choice.thresholds))
    return choice.to_dict(model.labels)


def evaluate_outputs(model, outputs: Outputs, targets: Targets, *, cross_fit: int = 0,
                     settings: ThresholdSettings = ThresholdSettings()) -> dict:
    """Metrics of ``model``'s probabilities and thresholds on its named outputs and targets.

    With a calibration, ``macro_ece_uncalibrated`` and per-label ``ece_uncalibrated`` give the
    ECE of the plain sigmoid beside the calibrated ``ece``. With ``cross_fit`` folds (0: off),
    ``cross_fit`` holds the F1 reached by thresholds chosen (the policy, metric, objective and
    seed of ``settings``; the exact tuner in its default mode) on the other folds (the honest
    estimate next to the in-sample ``macro_f1``). With regression outputs, ``regression`` gets their MSE and MAE (in the targets' units) over
    known targets.
    """
    regression = None if outputs.regression is None else \
        _regression_metrics(model, outputs.regression, targets.regression)
    logits, targets = outputs.logits, targets.labels
    probs = model.probabilities(logits)
    # Ranking metrics from float64 scores: float32 probabilities of large or strongly scaled
    # logits tie, and ties change AP. (The map is increasing, so the ranking is the logits'.)
    scores = apply_calibration(logits.double(), model.calibration_scale, model.calibration_bias)
    metrics = evaluate_predictions(probs, targets, model.thresholds.cpu(), model.labels,
                                   binary=model.task == "binary", scores=scores)
    metrics["calibration"] = model.calibration or "none"
    if model.calibration is not None:
        raw = calibration_error(torch.sigmoid(logits.double()), targets)
        metrics["macro_ece_uncalibrated"] = nanmean(raw)
        for name, value in zip(model.labels, raw.tolist()):
            metrics["per_label"][name]["ece_uncalibrated"] = None if math.isnan(value) else value
    if cross_fit:
        folds = min(cross_fit, len(probs))
        s = settings
        rows = cross_fit_predictions(probs, targets, folds, s.seed, metric=s.metric, policy=s.policy,
                                     fallback=s.fallback, **s.plan.objective)
        # only the cut-off figures: the ranking metrics do not depend on the thresholds
        crossed, per = cutoff_metrics(probs, targets, rows)
        metrics["cross_fit"] = {
            "folds": folds, **{k: crossed[k] for k in ("macro_f1", "micro_f1", "samples_f1", "weighted_f1")},
            "per_label_f1": {n: (None if math.isnan(f) else float(f)) for n, f in zip(model.labels, per["f1"])}}
    if regression is not None:
        metrics["regression"] = regression
    return metrics


def _regression_metrics(model, outputs: torch.Tensor, targets: torch.Tensor) -> dict:
    values = model.regression_values(outputs).double().cpu()
    targets = targets.double()
    result = {}
    for j, name in enumerate(model.regression_names):
        known = ~torch.isnan(targets[:, j])
        error = values[known, j] - targets[known, j]
        result[name] = {"mse": float(error.square().mean()) if known.any() else None,
                        "mae": float(error.abs().mean()) if known.any() else None, "n": int(known.sum())}
    return result


def _split_table(model, splits, split: str):
    """The ``split`` of ``splits`` (:func:`mlabel.resolve.resolve_for_model` reads them), its
    targets in the model's label order."""
    from .data import DataError
    table = getattr(splits, split, None)
    if table is None:
        have = [s for s in ("train", "val", "test") if getattr(splits, s) is not None]
        raise DataError(f"the data has no {split!r} split; available: {have} "
                        "(set data.test or data.test_fraction for a test split)")
    if splits.labels != model.labels:
        missing = sorted(set(model.labels) - set(splits.labels))
        extra = sorted(set(splits.labels) - set(model.labels))
        if missing or extra:
            raise DataError(f"the data's labels do not match the model's: missing {missing}, "
                            f"not known to the model {extra}")
        order = [splits.labels.index(name) for name in model.labels]
        table.targets = table.targets.reorder(order) if table.sparse else table.targets[:, order]
    return table


def split_loader(model, config, split: str, device: torch.device):
    """``config`` (a :class:`~mlabel.config.Config`) resolved for scoring ``model`` on ``split``
    (:func:`mlabel.resolve.resolve_for_model`), and the evaluation loader of that split under the
    resolved ``data`` section, targets in the model's label order; the model is moved to ``device``.
    Returns (the resolved config, the loader)."""
    from .data import ImageDataset, build_transform, make_loader
    from .data.dataset import LoaderSettings
    cfg, splits = resolve_for_model(config, model, device, scored=(split,))
    table = _split_table(model, splits, split)
    settings = LoaderSettings(num_workers=cfg.data.num_workers, seed=cfg.seed, pin_memory=device.type == "cuda")
    loader = make_loader(ImageDataset(table, build_transform(model.preprocessing, False)), cfg.data.batch_size,
                         train=False, settings=settings)
    model.to(device)
    return cfg, loader


def split_outputs(model, config, split: str, device: torch.device, quiet: bool = False) -> tuple[Outputs, Targets]:
    """Run ``model`` over one split of the data of ``config`` (a :class:`~mlabel.config.Config`,
    resolved here for that split); targets in the model's label order."""
    cfg, loader = split_loader(model, config, split, device)
    outputs, targets, _ = collect_predictions(model, loader, device, channels_last=cfg.train.channels_last,
                                              progress=None if quiet else split)
    return outputs, targets
