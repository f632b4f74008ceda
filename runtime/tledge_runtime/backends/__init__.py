"""Backends that run a model file: ONNX Runtime (CPU, CUDA, TensorRT EP), OpenVINO, native TensorRT
engines; how one is chosen (``loader``, ``auto``), engine files and builds, fixed-batch padding."""
