"""tledge-runtime: run tledge-exported image classifiers with numpy, Pillow and ONNX Runtime.

The device-side half of tledge. It never imports torch.
"""

__version__ = "0.1.0"
