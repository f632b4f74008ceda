"""Fit what a run's answers mean, after fine-tuning: the temperature, the operating point and the conformal
threshold on the validation split, the out-of-distribution detector on the training split and its threshold on
the validation split — never on the test split, which only reports what they give. Called by
:func:`tledge.train.finetune.finetune`, and by ``tledge export`` for a run fine-tuned before these existed.

A part that cannot be fitted (too few held-out images, an unreachable operating point) is left out, said in
the log and listed in ``Answers.unfitted``: never a silent default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from tledge.answers import calibrate, conformal, ood
from tledge.answers.operating_point import choose, parse_spec
from tledge.report.metrics import confusion_matrix, report
from tledge_runtime.answers.decision import decide, probabilities
from tledge_runtime.model.answers import OOD, Answers

log = logging.getLogger(__name__)

MIN_CALIBRATION = 30  # held-out images below which a temperature is not fitted
MIN_OOD = 20  # held-out images below which an out-of-distribution threshold is not chosen
SCORE_OUTPUT = "ood_score"  # the graph output holding the score (tledge_export.convert.ood_head.SCORE_NAME)


@dataclass
class Split:
    """One split's outputs from the fine-tuned model: pooled features, logits and true labels."""

    features: np.ndarray
    logits: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Wanted:
    """What to fit: the operating point (or None), the conformal coverage, the share of in-distribution images
    the "unknown" threshold keeps, the detector, and the most bytes its parameters may add to the model."""

    operating_point: Optional[str] = None
    coverage: float = 0.95
    ood_keep: float = 0.95
    ood_method: str = "mahalanobis"
    conformal_score: str = "lac"
    max_ood_bytes: int = 512 * 1024


def fit_answers(wanted: Wanted, classes: Sequence[str], train: Optional[Split], val: Optional[Split],
                test: Optional[Split] = None) -> tuple[Answers, Optional[ood.Detector], dict[str, Any]]:
    """The fitted :class:`Answers`, the out-of-distribution detector (None when not fitted) and a record for
    metrics.json: what was fitted on how many images, and what it gives on ``test``."""
    record: dict[str, Any] = {}
    unfitted: list[str] = []
    temperature, calibration = _temperature(val, test, record, unfitted)
    point = _operating_point(wanted, classes, val, temperature, record, unfitted)
    sets = _conformal(wanted, val, test, temperature, record, unfitted)
    detector, rule = _ood(wanted, train, val, test, temperature, record, unfitted)
    answers = Answers(temperature=temperature, operating_point=point, conformal=sets, ood=rule,
                      calibration=calibration, unfitted=tuple(unfitted))
    if test is not None and point is not None:
        pred = decide(probabilities(test.logits, temperature), classes, point)
        record["test_at_operating_point"] = report(confusion_matrix(test.labels, pred, len(classes)), classes)
    for note in unfitted:
        log.warning("%s", note)
    return answers, detector, record


def _temperature(val: Optional[Split], test: Optional[Split], record: dict, unfitted: list) -> tuple[float, str]:
    n = 0 if val is None else len(val)
    if n < MIN_CALIBRATION:
        unfitted.append(f"calibration: only {n} validation images ({MIN_CALIBRATION} needed); scores are the "
                        "uncalibrated softmax")
        return 1.0, ""
    t = calibrate.fit_temperature(val.logits, val.labels)
    said = (f"temperature {t:.3g} fitted on the val split, {n} images: NLL "
            f"{calibrate.nll(val.logits, val.labels):.3f} -> {calibrate.nll(val.logits, val.labels, t):.3f}")
    if calibrate.at_bound(t):
        said += f" (at the search bound {calibrate.T_RANGE}: the split is too small or too easy to say more)"
    record["calibration_fit"] = {"temperature": t, "fitted_on": said}
    if test is not None and len(test):
        record["calibration_fit"]["test"] = calibrate.calibration_report(test.logits, test.labels, t)
    log.info("calibration: %s", said)
    return t, said


def _operating_point(wanted: Wanted, classes: Sequence[str], val: Optional[Split], t: float, record: dict,
                     unfitted: list) -> Any:
    if wanted.operating_point is None:
        return None
    spec = parse_spec(wanted.operating_point)
    if val is None or len(val) == 0:
        point, said = None, "the run has no validation images to choose it on"
    else:
        point, said = choose(spec, probabilities(val.logits, t), val.labels, classes, "val split")
    if point is None:
        unfitted.append(f"operating point {wanted.operating_point}: {said}; the model answers with the most "
                        "probable class")
        record["operating_point"] = {"asked": wanted.operating_point, "refused": said}
    else:
        log.info("operating point: %s (%s)", point.describe(), said)
        record["operating_point"] = dict(vars(point))
    return point


def _conformal(wanted: Wanted, val: Optional[Split], test: Optional[Split], t: float, record: dict,
               unfitted: list) -> Any:
    if val is None:
        unfitted.append("conformal sets: the run has no validation images")
        return None
    sets, said = conformal.fit_conformal(probabilities(val.logits, t), val.labels, wanted.coverage,
                                         wanted.conformal_score)
    if sets is None:
        unfitted.append(said)
        return None
    record["conformal"] = dict(vars(sets))
    if test is not None and len(test):
        record["conformal"]["test"] = conformal.set_report(probabilities(test.logits, t), test.labels, sets)
    log.info("prediction sets: coverage %g, threshold %.4g (%s)", sets.coverage, sets.threshold, said)
    return sets


def _ood(wanted: Wanted, train: Optional[Split], val: Optional[Split], test: Optional[Split], t: float,
         record: dict, unfitted: list) -> tuple[Optional[ood.Detector], Optional[OOD]]:
    if train is None or val is None or len(val) < MIN_OOD:
        unfitted.append(f"unknown: only {0 if val is None else len(val)} validation images to set its threshold "
                        f"({MIN_OOD} needed)")
        return None, None
    detector = ood.fit(wanted.ood_method, train.features, train.labels, t, wanted.max_ood_bytes)
    if detector.nbytes > wanted.max_ood_bytes:
        unfitted.append(f"unknown: the {wanted.ood_method} detector needs {detector.nbytes} bytes, more than the "
                        f"{wanted.max_ood_bytes} allowed")
        return None, None
    val_scores = detector.score(val.features, val.logits)
    threshold = ood.threshold(val_scores, wanted.ood_keep)
    said = (f"{detector.method} on {len(train)} training images ({detector.nbytes} bytes); threshold on the val "
            f"split, {len(val)} images, keeps {100 * float((val_scores < threshold).mean()):.1f}%")
    rule = OOD(detector.method, SCORE_OUTPUT, threshold, wanted.ood_keep, said)
    record["ood"] = dict(vars(rule))
    if test is not None and len(test):
        record["ood"]["test_kept"] = float((detector.score(test.features, test.logits) < threshold).mean())
    log.info("unknown: %s", said)
    return detector, rule
