"""tledge's error types. All derive from :class:`tledge_runtime.errors.TledgeError` and carry a hint;
the CLI turns them into one-line messages in one place (:mod:`tledge.cli.main`)."""

from tledge_runtime.errors import ImageError, MetadataError, ModelError, TledgeError

__all__ = ["TledgeError", "DataError", "ConfigError", "CheckpointError", "WeightsError",
           "ImageError", "MetadataError", "ModelError"]


class DataError(TledgeError):
    """The dataset folder is unusable: missing, empty class, single class, classes differ between splits."""


class ConfigError(TledgeError):
    """An option value or combination of options cannot work."""


class CheckpointError(TledgeError):
    """A checkpoint is missing, corrupt, not tledge's, or would need unsafe loading."""


class WeightsError(TledgeError):
    """Pretrained weights are unavailable (offline, no cache) or do not fit the architecture."""
