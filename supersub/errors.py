"""Errors that are the user's to fix: the CLI prints them as one line and exits with status 2."""

from supersub.config import ConfigError
from supersub.hierarchy.core import HierarchyError


class DataError(ValueError):
    """Input data that cannot be used as asked (missing class, unknown id, no images, bad path)."""


class BundleError(ValueError):
    """A bundle that is missing, changed, foreign or of an unknown format version."""


# Everything the CLI reports as a clean error rather than a traceback.
UserError = (ConfigError, HierarchyError, DataError, BundleError, FileNotFoundError)
