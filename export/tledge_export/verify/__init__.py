"""Parity with PyTorch: comparing outputs (``compare``) and the reference set written into every file
(``references``)."""
