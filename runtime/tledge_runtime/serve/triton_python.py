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

from tledge_runtime.errors import TledgeError
from tledge_runtime.serve import served_model as sm


class TritonPythonModel:
    """The class Triton's Python backend instantiates; see Triton's python_backend README for the protocol."""

    def initialize(self, args: dict[str, str]) -> None:
        from tledge_runtime.classifier import Classifier

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
        prepared: list[np.ndarray] = []  # one array per request that decoded
        spans: list[Any] = []  # per request: (start, count) into ``prepared``, or the error to answer with
        for request in requests:
            encoded = pb_utils.get_input_tensor_by_name(request, sm.IMAGE_INPUT).as_numpy()
            try:
                images = sm.prepare_images(clf, encoded)
            except TledgeError as e:  # the client's fault: Triton answers 400, not 500
                spans.append(pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
                continue
            spans.append((sum(len(p) for p in prepared), len(images)))
            prepared.append(images)
        probs, scores = clf.infer_scored(np.concatenate(prepared)) if prepared else (
            np.zeros((0, clf.meta.num_classes)), None)
        responses = []
        for span in spans:
            if not isinstance(span, tuple):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=span))
                continue
            rows = probs[span[0]:span[0] + span[1]]
            ood = None if scores is None else scores[span[0]:span[0] + span[1]]
            results = sm.image_results(rows, clf.answerer.predictions(rows, ood))
            outputs = [pb_utils.Tensor(name, array) for name, array in results.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses

    def finalize(self) -> None:
        self.classifier.close()

