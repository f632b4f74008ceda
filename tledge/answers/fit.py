"""Fit what the run's answers mean on its validation split (never the test split), after fine-tuning, and
report what they give on the test split. Called by :func:`tledge.train.finetune.finetune` (and by
``tledge export`` for a run fine-tuned before these existed)."""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np

from tledge.answers.operating_point import parse_spec
from tledge.report.metrics import confusion_matrix, report
from tledge_runtime.answers.decision import decide, probabilities
from tledge_runtime.model.answers import Answers

log = logging.getLogger(__name__)


def fit_answers(operating_point: Optional[str], classes: Sequence[str], val: Optional[tuple[np.ndarray, np.ndarray]],
                test: Optional[tuple[np.ndarray, np.ndarray]] = None) -> tuple[Answers, dict[str, Any]]:
    """``Answers`` fitted on ``val`` = (logits, labels), and a record for metrics.json: what was fitted, on how
    many images, what it gives on ``test`` = (logits, labels) when given, and what could not be fitted and why."""
    from tledge.answers.operating_point import choose

    record: dict[str, Any] = {}
    temperature = 1.0
    point = None
    if operating_point is not None:
        spec = parse_spec(operating_point)
        if val is None or len(val[1]) == 0:
            point, said = None, "the run has no validation images to choose it on"
        else:
            point, said = choose(spec, probabilities(val[0], temperature), val[1], classes, "val split")
        if point is None:
            log.warning("operating point %s not set: %s; the model answers with the most probable class",
                        operating_point, said)
            record["operating_point"] = {"asked": operating_point, "refused": said}
        else:
            log.info("operating point: %s (%s)", point.describe(), said)
            record["operating_point"] = dict(vars(point))
    answers = Answers(temperature=temperature, operating_point=point)
    if test is not None and point is not None:
        pred = decide(probabilities(test[0], temperature), classes, point)
        record["test_at_operating_point"] = report(confusion_matrix(test[1], pred, len(classes)), classes)
    return answers, record
