"""tledge-export: PyTorch classifier -> verified ONNX / TensorRT with tledge metadata."""

__version__ = "0.1.0"
