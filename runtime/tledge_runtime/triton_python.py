"""tledge_runtime inside Triton's Python backend: the ``<arch>_<format>_image`` models of ``tledge export --triton``.

Encoded image files in (input ``image``, BYTES, one per batch row), and out the best label, its
score and every class's probability (``probabilities`` has labels.txt, so Triton's classification
extension answers the top k). Decoding and preprocessing are tledge_runtime's, the same code the
device runs, on the ONNX file the model's ``tledge_model`` parameter names (the sibling graph
model's, relative to this model's folder). The module ``triton_python_backend_utils`` exists only
inside Triton's Python backend stub, so it is imported there, not here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from . import served_model as sm
from .errors import ImageError, TledgeError


class TritonPythonModel:
    """The class Triton's Python backend instantiates; see Triton's python_backend README for the protocol."""

    def initialize(self, args: dict[str, str]) -> None:
        from .classifier import Classifier

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        if "tledge_model" not in params:
            raise TledgeError(f"model {config.get('name')!r} has no 'tledge_model' parameter",
                              hint="re-write the repository with tledge export --triton")
        path = (Path(args["model_repository"]) / params["tledge_model"]).resolve()
        self.classifier = Classifier(path, device=params.get("tledge_device", "auto"))

    def execute(self, requests: list[Any]) -> list[Any]:
        """One model run for the images of every request in the batch; a bad image fails only its request."""
        import triton_python_backend_utils as pb_utils

        clf = self.classifier
        prepared: list[np.ndarray] = []
        spans: list[Any] = []  # per request: (start, count) into ``prepared``, or the error to answer with
        for request in requests:
            encoded = pb_utils.get_input_tensor_by_name(request, sm.IMAGE_INPUT).as_numpy()
            try:
                images = [_prepare(clf, row, i) for i, row in enumerate(encoded.reshape(len(encoded), -1))]
            except TledgeError as e:  # the client's fault: Triton answers 400, not 500
                spans.append(pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
                continue
            spans.append((len(prepared), len(images)))
            prepared += images
        probs = clf.infer(np.stack(prepared)) if prepared else np.zeros((0, clf.meta.num_classes))
        responses = []
        for span in spans:
            if not isinstance(span, tuple):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=span))
                continue
            rows = probs[span[0]:span[0] + span[1]]
            best = rows.argmax(axis=1)
            labels = np.array([[clf.labels[i].encode("utf-8")] for i in best], dtype=np.object_)
            outputs = [pb_utils.Tensor(sm.LABEL_OUTPUT, labels),
                       pb_utils.Tensor(sm.SCORE_OUTPUT, rows[np.arange(len(rows)), best].astype(np.float32)[:, None]),
                       pb_utils.Tensor(sm.PROBABILITIES_OUTPUT, rows.astype(np.float32))]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses

    def finalize(self) -> None:
        self.classifier.close()


def _prepare(clf: Any, row: np.ndarray, i: int) -> np.ndarray:
    if row.size != 1:
        raise ImageError(f"input {sm.IMAGE_INPUT!r}: {row.size} elements in row {i}, one encoded image per row expected",
                         hint="send shape [N, 1]", kind="bad_array")
    try:
        return clf.prepare(bytes(row[0]))
    except ImageError as e:  # load_image names in-memory sources "<bytes>"; here they are rows of the input
        raise ImageError(e.message.replace("<bytes>", f"image {i}", 1), e.hint, e.kind) from None
