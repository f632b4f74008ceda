"""tledge-runtime: run tledge-exported image classifiers with numpy, Pillow and ONNX Runtime.

The device-side half of tledge. It never imports torch::

    from tledge_runtime import Classifier
    clf = Classifier("model.onnx")
    clf.predict("part.png")   # Prediction(label='ok', index=0, score=0.98)

``Classifier`` and ``Prediction`` are loaded on first use, so ``import tledge_runtime``
costs milliseconds; onnxruntime is imported only when a model is opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Classifier", "Prediction", "__version__"]

if TYPE_CHECKING:
    from tledge_runtime.classifier import Classifier, Prediction


def __getattr__(name: str) -> Any:
    if name in ("Classifier", "Prediction"):
        from tledge_runtime import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module 'tledge_runtime' has no attribute {name!r}")
