"""PyTorch to ONNX and between precisions: the fp32 export (``onnx_export``), static padding, baked
preprocessing, fp16."""
