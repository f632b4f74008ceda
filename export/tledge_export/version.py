"""The version of tledge-export, written into the provenance of every exported file."""

__version__ = "0.1.0"
