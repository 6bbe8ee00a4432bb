"""Find the wrong labels: ``mlabel audit RECIPE [key=value ...] --out DIR`` (the same as
``python -m mlabel.audit`` and ``mlabel.audit(...)``), then ``mlabel audit apply DIR
corrections.csv --out NEW_LABELS``.

Python contract (kept stable for ``benchmarks/audit.py``)::

    from mlabel.audit import audit, AuditResult, suspicion
    result = audit(recipe, overrides=(), *, out=DIR, folds=5, budget="fast", from_run=None, seed=0,
                   scoring="abs", top=5000, quiet=False)
    result.paths     # list[str] (N,) image ids as in the label table (train rows then val rows)
    result.labels    # list[str] (L,)
    result.given     # np.ndarray int8 (N, L): 1, 0, -1 unknown
    result.probs     # np.ndarray float32 (N, L): calibrated out-of-fold probabilities
    result.missing, result.spurious  # np.ndarray float32 (N, L) suspicion, NaN where not applicable
    result.summary   # dict, as written to summary.json
    result.out       # Path of DIR
    result.thresholds, result.fold   # (L,) thresholds on the OOF probabilities, (N,) fold of each row
    missing, spurious = suspicion(probs, given, scoring="abs", thresholds=None)

The package module itself is callable (``mlabel.audit(recipe, ...)`` is :func:`audit`), so the
package, ``python -m mlabel.audit`` and the function share one name.
"""
from __future__ import annotations

import sys
import types

from .core import DEFAULT_TOP, AuditResult, audit
from .rank import DEFAULT_SCORING, SCORINGS, suspicion

__all__ = ["audit", "AuditResult", "suspicion", "SCORINGS", "DEFAULT_SCORING", "DEFAULT_TOP"]


class _CallableModule(types.ModuleType):
    """``mlabel.audit`` is this package; calling it runs :func:`audit`."""

    def __call__(self, *args, **kwargs) -> AuditResult:
        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
