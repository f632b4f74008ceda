"""What an answer means on the device: calibrated probabilities and the operating point, through Classifier,
the CLI and serve — the same decision export verification made (tledge_runtime.answers.decision)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from runtime_testkit import build_graph, colour_image, make_meta, write_model

from tledge_runtime import Classifier
from tledge_runtime.answers.decision import decide, margin_change, margins, probabilities
from tledge_runtime.errors import MetadataError
from tledge_runtime.model.answers import Answers, OperatingPoint
from tledge_runtime.model.meta import ModelMeta

LABELS = ("red", "green")


def _binary(tmp_path, answers=None, name="m.onnx"):
    meta = replace(make_meta(labels=LABELS), answers=answers)
    return write_model(tmp_path / name, graph=build_graph(classes=2), meta=meta)


def test_temperature_scales_the_logits_before_the_softmax(tmp_path):
    image = colour_image("red", 0)
    with Classifier(_binary(tmp_path, name="a.onnx"), device="cpu") as plain, \
            Classifier(_binary(tmp_path, Answers(temperature=2.0), name="b.onnx"), device="cpu") as warm:
        p, q = plain.scores(image), warm.scores(image)
        assert plain.predict(image).label == warm.predict(image).label == "red"
    logits = np.log(p)  # up to a constant
    assert np.allclose(q, probabilities(logits[None], 2.0)[0], atol=1e-9)
    assert q.max() < p.max()


def test_an_operating_point_decides_the_label_everywhere(tmp_path):
    red = colour_image("red", 1)
    with Classifier(_binary(tmp_path, name="plain.onnx"), device="cpu") as plain:
        p_green = plain.scores(red)[1]
        assert p_green < 0.5 and plain.predict(red).label == "red"
    point = OperatingPoint("green", threshold=p_green * 0.9, target="recall=0.99", measured="test")
    path = _binary(tmp_path, Answers(operating_point=point))
    with Classifier(path, device="cpu") as clf:
        answer = clf.predict(red)
        assert answer.label == "green" and answer.score == pytest.approx(p_green)
        assert clf.topk(red, 2)[0].label == "red"  # top-k stays the ranking by probability
        assert [a.label for a in clf.predict_batch([red, colour_image("green", 2)])] == ["green", "green"]


def test_the_runtime_cli_prints_the_decided_label(tmp_path):
    from PIL import Image

    from tledge_runtime.cli import main

    red = tmp_path / "red.png"
    Image.fromarray(colour_image("red", 1)).save(red)
    with Classifier(_binary(tmp_path, name="plain.onnx"), device="cpu") as plain:
        p_green = plain.scores(str(red))[1]
    path = _binary(tmp_path, Answers(operating_point=OperatingPoint("green", p_green * 0.9, "recall=0.99")))
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["-q", "predict", str(path), str(red), "--json"]) == 0
    assert json.loads(out.getvalue())["label"] == "green"


def test_margins_and_their_change_are_in_logit_units():
    z = np.array([[3.0, 1.0, 0.0], [0.0, 0.2, 0.1]])
    pred, m = margins(z, ("a", "b", "c"))
    assert list(pred) == [0, 1] and np.allclose(m, [2.0, 0.1])
    moved = z + np.array([[0.0, 0.5, -0.25], [0.0, 0.0, 0.0]])
    assert np.allclose(margin_change(z, moved, pred), [0.5, 0.0])
    point = OperatingPoint("b", 0.5, "recall=0.9")  # threshold 0.5: the boundary is z_b == z_a
    pred2, m2 = margins(np.array([[1.0, 0.25]]), ("a", "b"), point)
    assert list(pred2) == [0] and np.allclose(m2, [0.75])
    assert list(decide(probabilities(np.array([[1.0, 0.25]])), ("a", "b"), OperatingPoint("b", 0.3, "recall=0.9"))) == [1]


@pytest.mark.parametrize("bad, words", [
    ({"operating_point": {"label": "green", "threshold": 1.0, "target": "recall=0.95"}}, "strictly between 0 and 1"),
    ({"operating_point": {"label": "green", "threshold": 0.3, "target": "f1=0.9"}}, "recall=0.95"),
    ({"operating_point": {"label": "blue", "threshold": 0.3, "target": "recall=0.9"}}, "one of its labels"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": 1.0, "calibrator": "isotonic"}, "unknown answers"),
])
def test_hostile_answers_are_refused_with_the_field_named(bad, words):
    doc = json.loads(replace(make_meta(labels=LABELS), answers=Answers()).to_json())
    doc["answers"] = bad
    with pytest.raises(MetadataError) as e:
        ModelMeta.from_json(json.dumps(doc))
    assert words in e.value.message


def test_a_schema_2_file_without_answers_still_loads_and_answers_with_the_top_class(tmp_path):
    doc = json.loads(make_meta(labels=LABELS).to_json())
    doc["schema_version"] = 2
    del doc["answers"]
    path = write_model(tmp_path / "old.onnx", graph=build_graph(classes=2), meta_json=json.dumps(doc))
    with Classifier(path, device="cpu") as clf:
        assert clf.meta.answers is None and clf.predict(colour_image("green", 3)).label == "green"
