"""The model-artifact contract: the versioned metadata document (``meta``), its bounded field checks
(``bounds``), the verification record and the embedded reference set."""
