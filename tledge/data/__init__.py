"""Datasets: class folders and splits (``folders``), decoding them once (``imagecache``), ELPV (``elpv``)."""
