"""The reference check: replay the reference set a model carries (decode, resize, normalize, numerics)
on the backend that runs it."""
