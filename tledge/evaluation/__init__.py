"""Evaluating a checkpoint on a test split (``evaluate``) and benchmarking every exported format
(``benchmark``)."""
