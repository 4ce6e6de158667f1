"""The errors compress raises on bad input.

Every message names the file, tensor, layer or field at fault and says what to do about it.
They all derive from ``CompressError`` so a caller can catch one type; each also derives from
the built-in exception a Python user would expect (``ValueError``, ``FileNotFoundError``).
"""

from __future__ import annotations


class CompressError(Exception):
    """Base class of every error compress raises on purpose."""


class ConfigError(CompressError, ValueError):
    """A config, recipe or CLI value is wrong (unknown key, bad value, impossible group size)."""


class ModelLoadError(CompressError, ValueError):
    """A model could not be loaded: missing path, unsupported architecture, bad config."""


class CheckpointError(CompressError, ValueError):
    """A checkpoint on disk is corrupt, truncated, incomplete or in a format we cannot read."""


class DataError(CompressError, ValueError):
    """Calibration or evaluation text is missing or too short for what was asked."""


class MissingPathError(CompressError, FileNotFoundError):
    """A path the user gave does not exist."""
