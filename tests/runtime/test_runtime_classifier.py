"""Classifier: right answers on real files, every input form agrees, batches, top-k, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image
from runtime_testkit import LABELS, SIZE, colour_image

from tledge_runtime import Classifier, Prediction
from tledge_runtime.errors import BackendError, ImageError, TledgeError


@pytest.mark.parametrize("variant", ["fp32", "fp16", "baked", "probabilities", "fixed2"])
def test_predicts_the_colour_of_png_and_jpeg_files(models, images, variant):
    with Classifier(models[variant]) as clf:
        assert clf.backend_name == "ort-cpu"  # auto on a machine without a GPU provider
        for label, files in images.items():
            for path in files:
                p = clf.predict(path)
                assert isinstance(p, Prediction)
                assert (p.label, p.index) == (label, LABELS.index(label)), path
                assert 0.5 < p.score <= 1.0


def test_variants_agree_on_scores(models, images):
    files = [f for fs in images.values() for f in fs]
    reference = None
    for variant in ("fp32", "baked", "probabilities", "fixed2", "fp16"):
        with Classifier(models[variant], device="cpu") as clf:
            scores = clf.scores_batch(files)
        if reference is None:
            reference = scores
        else:
            # fp16 arithmetic keeps ~3 significant digits; the others compute the same floats.
            np.testing.assert_allclose(scores, reference, atol=3e-3 if variant == "fp16" else 1e-5)


def test_scores_are_a_softmax_of_the_graph_logits(classifier, images):
    path = images["green"][0]
    probs = classifier.scores(path)
    assert probs.shape == (3,)
    assert probs.sum() == pytest.approx(1.0)
    # The graph's logits are the mean normalized channel values; recompute them with numpy.
    p = classifier.meta.preprocess
    hwc = classifier.prepare(path).astype(np.float64) * p.scale
    logits = ((hwc - np.asarray(p.mean)) / np.asarray(p.std)).mean(axis=(0, 1))
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_path_bytes_pil_array_and_bgr_inputs_agree(classifier, images):
    path = images["blue"][1]  # a JPEG
    rgb = np.asarray(Image.open(path).convert("RGB"))
    by_path = classifier.scores(path)
    for other in (classifier.scores(str(path)), classifier.scores(path.read_bytes()),
                  classifier.scores(Image.open(path)), classifier.scores(rgb),
                  classifier.scores(np.ascontiguousarray(rgb[:, :, ::-1]), channel_order="bgr"),
                  classifier.scores(np.ascontiguousarray(rgb[:, :, ::-1]), channel_order="BGR")):
        np.testing.assert_array_equal(other, by_path)


def test_bgr_order_matters_for_arrays(classifier):
    rgb = colour_image("red", seed=3)
    assert classifier.predict(rgb).label == "red"
    assert classifier.predict(rgb, channel_order="bgr").label == "blue"  # channels swapped: red reads as blue


def test_grayscale_and_rgba_arrays_are_accepted(classifier):
    grey = np.full((20, 20), 128, dtype=np.uint8)
    assert classifier.predict(grey).label in LABELS
    rgba = np.dstack([colour_image("green", 4, (20, 20)), np.full((20, 20), 255, np.uint8)])
    assert classifier.predict(rgba).label == "green"


@pytest.mark.parametrize("variant", ["fp32", "fixed2", "baked"])
def test_predict_batch_equals_predict(models, images, variant):
    files = [f for fs in images.values() for f in fs][:7]  # odd count: the fixed-batch graph needs padding
    with Classifier(models[variant]) as clf:
        batch = clf.predict_batch(files)
        single = [clf.predict(f) for f in files]
    assert [(p.label, p.index) for p in batch] == [(p.label, p.index) for p in single]
    np.testing.assert_allclose([p.score for p in batch], [p.score for p in single], atol=1e-6)


def test_predict_batch_chunks_long_lists(classifier, images):
    files = [images["red"][0], images["blue"][0]] * 40  # 80 images: more than one chunk of 32
    preds = classifier.predict_batch(files)
    assert len(preds) == 80
    assert [p.label for p in preds] == ["red", "blue"] * 40


def test_predict_batch_accepts_a_stacked_array_and_empty_lists(classifier):
    frames = np.stack([colour_image(n, seed=i, size=(24, 24)) for i, n in enumerate(LABELS)])
    assert [p.label for p in classifier.predict_batch(frames)] == list(LABELS)
    assert classifier.predict_batch([]) == []
    assert classifier.scores_batch([]).shape == (0, 3)


def test_topk_orders_all_classes_and_clamps_k(classifier, images):
    top = classifier.topk(images["red"][2], k=2)
    assert [p.label for p in top][0] == "red" and len(top) == 2
    everything = classifier.topk(images["red"][2], k=10)
    assert len(everything) == 3 and {p.label for p in everything} == set(LABELS)
    assert [p.score for p in everything] == sorted((p.score for p in everything), reverse=True)
    assert sum(p.score for p in everything) == pytest.approx(1.0)
    assert everything[0] == classifier.predict(images["red"][2])
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(TledgeError) as e:
            classifier.topk(images["red"][2], k=bad)
        assert e.value.hint


def test_prediction_is_frozen_and_serialisable(classifier, images):
    p = classifier.predict(images["green"][0])
    with pytest.raises(AttributeError):
        p.label = "x"
    assert p.to_dict() == {"label": "green", "index": 1, "score": p.score}
    assert isinstance(p.score, float) and isinstance(p.index, int)


def test_labels_meta_and_repr(classifier):
    assert classifier.labels == LABELS
    assert classifier.meta.preprocess.height == SIZE
    assert "ort-cpu" in repr(classifier)


def test_infer_takes_only_prepared_batches(classifier):
    good = np.stack([classifier.prepare(colour_image("red", 1))])
    assert classifier.infer(good).shape == (1, 3)
    for bad in (good[0], good.astype(np.float32), np.zeros((1, SIZE + 1, SIZE, 3), np.uint8), [good[0]]):
        with pytest.raises(ImageError) as e:
            classifier.infer(bad)
        assert "prepare" in e.value.hint


def test_closed_classifier_refuses_to_predict(models, images):
    clf = Classifier(models["fp32"])
    with clf:
        clf.predict(images["red"][0])
    assert "closed" in repr(clf)
    with pytest.raises(BackendError) as e:
        clf.predict(images["red"][0])
    assert e.value.hint
    clf.close()  # closing twice is harmless


def test_threads_option_reaches_the_engine(models, images):
    with Classifier(models["fp32"], backend="ort-cpu", threads=1) as clf:
        options = clf._live()._session.get_session_options()
        assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
        assert clf.predict(images["blue"][0]).label == "blue"
    with Classifier(models["fp32"], backend="ort-cpu") as clf:  # default: the engine's own choice
        assert clf._live()._session.get_session_options().intra_op_num_threads == 0


@pytest.mark.parametrize("variant", ["fp32", "fp16", "baked"])
def test_openvino_backend_agrees_with_onnxruntime(models, images, variant):
    pytest.importorskip("openvino")
    files = [f for fs in images.values() for f in fs]
    with Classifier(models[variant], backend="openvino", threads=1) as ov, Classifier(models[variant]) as ort:
        assert ov.backend_name == "openvino"
        np.testing.assert_allclose(ov.scores_batch(files), ort.scores_batch(files), atol=2e-3)


@pytest.mark.parametrize("backend", ["ort-cpu", "openvino"])
def test_concurrent_predictions_match_serial_ones(models, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    frames = [colour_image(LABELS[i % 3], seed=100 + i, size=(20 + i % 7, 18 + i % 5)) for i in range(24)]
    with Classifier(models["fp32"], backend=backend, threads=1) as clf:
        expected = [clf.scores(f) for f in frames]
        failures: list[str] = []
        results: dict[int, int] = {}

        def worker(t: int) -> None:
            done = 0
            try:
                for i in range(250):
                    j = (t * 7 + i) % len(frames)
                    if i % 10 == 0:  # mix in batches: they share the same session
                        got = clf.scores_batch([frames[j], frames[(j + 1) % len(frames)]])
                        nxt = (j + 1) % len(frames)
                        ok = np.array_equal(got[0], expected[j]) and np.array_equal(got[1], expected[nxt])
                    else:
                        ok = np.array_equal(clf.scores(frames[j]), expected[j])
                    if not ok:
                        failures.append(f"thread {t} item {i}")
                    done += 1
            except Exception as e:
                failures.append(f"thread {t}: {e!r}")
            results[t] = done

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == []
    assert sum(results.values()) == 8 * 250
